"""HTTP routes, wire schemas, dependencies and the mapping of errors to problems."""
