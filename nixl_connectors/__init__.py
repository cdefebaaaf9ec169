"""Engine connectors (vLLM, TensorRT-LLM) and user tools on top of the `transport` core."""
__version__ = "0.1.0"
