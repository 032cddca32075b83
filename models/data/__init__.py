"""The data contract a retailer provides, and adapters that turn public datasets into it."""
