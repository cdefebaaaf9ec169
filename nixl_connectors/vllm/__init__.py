"""vLLM adapter: `UcxConnector` (import `nixl_connectors.vllm.connector`; needs vllm)."""
__all__ = ["UcxConnector"]


def __getattr__(name: str):
    if name == "UcxConnector":
        from .connector import UcxConnector
        return UcxConnector
    raise AttributeError(name)
