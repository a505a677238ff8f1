"""Backend adapters, one module per kind of backend (see coalesce.adapter)."""
