import os

# no test may reach the network: OpenMMLab would try to fetch checkpoints on init
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs (the README's test command runs them too)"
    )
