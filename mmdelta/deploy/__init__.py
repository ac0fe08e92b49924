"""Deployment: standalone checkpoints (patch merged, no mmdelta needed) and ONNX export."""
