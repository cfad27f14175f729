"""What the tests share: tiny checkpoints, reference decoders, the real runtimes they require.

The tests run in pytest's importlib mode with tests/ on sys.path (pyproject.toml), so the checkout root never
is: this package has a name no installed distribution uses (xdsl, for one, installs a top-level ``tests``).
"""
