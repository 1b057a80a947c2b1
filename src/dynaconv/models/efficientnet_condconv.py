"""Networks: efficientnet_condconv (to be implemented by its issue)."""

__all__: list[str] = []
