"""dalorra's command-line entry point. The library lives in `adapters` (trainer, model), `server` (HTTP API)
and `clients` (Python client); this package only dispatches `dalorra <command>` to them."""
