"""All SQL of the API, one module per domain. Services call these functions with the unit of work's
session and never commit (see app.db); nothing outside this package builds or runs a query."""
