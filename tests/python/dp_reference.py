"""Reference values for fedge's privacy accountant (common/src/privacy.rs).

Computes ε with Google's dp_accounting (pip install dp-accounting==0.6.0),
composing Poisson-sampled Gaussian events over the integer Rényi orders
fedge tracks, and prints them as the Rust array literal in
common/src/privacy_reference.in:

    python3 tests/python/dp_reference.py > common/src/privacy_reference.in
"""

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

ORDERS = list(range(2, 64)) + [128, 256, 512, 1024]

CASES = [
    # (sampling rate q, noise multiplier z, rounds, delta)
    (1.0, 1.0, 1, 1e-5),
    (1.0, 1.1, 10, 1e-5),
    (0.5, 0.8, 20, 1e-5),
    (0.1, 1.0, 100, 1e-5),
    (0.01, 1.1, 1000, 1e-5),
    (0.001, 1.0, 10000, 1e-6),
    (0.25, 4.0, 50, 1e-3),
    (0.05, 0.6, 200, 1e-5),
]

print("// (q, noise multiplier, rounds, delta, epsilon) from tests/python/dp_reference.py")
print("// (dp_accounting %s)." % getattr(dp_accounting, "__version__", "0.6.0"))
print("&[")
for q, z, rounds, delta in CASES:
    acc = rdp.RdpAccountant(orders=ORDERS)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    eps = acc.get_epsilon(delta)
    print(f"    ({float(q)!r}, {float(z)!r}, {rounds}, {delta!r}, {float(eps)!r}),")
print("]")
