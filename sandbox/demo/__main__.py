"""`python -m sandbox.demo`."""

from sandbox.demo.cli import main

main()
