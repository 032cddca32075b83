"""The I/O edge: HTTP API, snapshot stores, settings, CLI and the request pipeline."""
