"""The admin API: tenants and their API keys, behind the admin key from configuration."""
