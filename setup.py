from setuptools import find_packages, setup

setup(
    name="mmdelta",
    version="0.1.0",
    description="Delta-Patching for OpenMMLab: adapt frozen detectors and segmenters "
    "with small zero-initialised branches, without base performance loss",
    packages=find_packages(include=["mmdelta", "mmdelta.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "mmengine>=0.10",
        "mmcv>=2.0,<2.2",
        "mmdet>=3.0",
        "mmsegmentation>=1.0",
        "mmpretrain>=1.0",
        "safetensors",
    ],
)
