"""Networks: g_resnext (to be implemented by its issue)."""

__all__: list[str] = []
