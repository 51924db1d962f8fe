"""Device-side and test tools: the local stack, the simulated fleet, the verifier, `tail`.

The product (what `run` needs) never imports this package.
"""
