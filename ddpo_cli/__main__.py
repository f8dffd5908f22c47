"""`python -m ddpo_cli ...` and `accelerate launch -m ddpo_cli train ...`."""
from .cli import main

main()
