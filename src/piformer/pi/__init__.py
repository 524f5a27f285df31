"""Private inference: what a model costs under two-party secure computation.

  cost          analytic nonlinear-op counts, paper-convention FLOPs, exact MACs (no SPU needed)
  jax_forward   the forward pass as a program of operator-class steps, in plain JAX
  secure        that program under SecretFlow SPU, two parties, measured (needs the `pi` extra)
  spu_backend   SPU settings, compilation, private shares, links, SPU log counters
  netsim        a userspace relay adding delay / bandwidth caps to a TCP link
  tokens        which token ids a query runs on

Nothing heavy is imported here: `import piformer.pi.cost` works without jax or spu.
"""
