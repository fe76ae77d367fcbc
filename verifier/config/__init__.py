"""The settings schema: one module per section, each a frozen dataclass; nothing here imports a service."""
