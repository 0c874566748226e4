"""ODE samplers for rectified flow: Euler, Heun and Adams-Bashforth-style linear multistep
(paper Fig. 6f; official src/diffusion/flow_matching/sampling.py and adam_sampling.py:
AdamLMSampler), plus classifier-free guidance in an interval.

Convention (the official code's): t = 0 is noise, t = 1 is data, dx/dt = v(x, t).
`fn(x, t)` is any velocity function, t a tensor of shape (B,). Imports only torch.
"""
import torch

SOLVERS = ("euler", "heun", "adams2", "adams3", "adams4")


def time_grid(num_steps, shift=1.0, last_step=None):
    """num_steps + 1 times from 0 to 1 (float32, as the official grid).

    linspace(0, 1 - last_step, num_steps) then 1.0; last_step None means 1/num_steps, a uniform
    grid. shift > 1 moves the steps towards the noise end: t' = t / (t + (1 - t) shift).
    """
    last_step = 1.0 / num_steps if last_step is None else last_step
    t = torch.cat([torch.linspace(0, 1 - last_step, num_steps), torch.ones(1)])
    return t / (t + (1 - t) * shift)


def adams_coefficients(ts, i, order):
    """Weights (oldest first, summing to 1) of the last k = min(order, i+1) velocities for the
    step t_i -> t_{i+1}: the integrals of the Lagrange basis polynomials on the nodes
    t_{i-k+1..i} over the step, divided by the step length (official adam_sampling.py:
    _reparameterize_coeffs with pre_integral.py: lagrange_preint)."""
    k = min(order, i + 1)
    nodes = [float(x) for x in ts[i - k + 1: i + 1]]
    a, b = float(ts[i]), float(ts[i + 1])
    # 3-point Gauss-Legendre quadrature: exact for the polynomials of degree <= 3 used here.
    gl = [(-0.7745966692414834, 5 / 9), (0.0, 8 / 9), (0.7745966692414834, 5 / 9)]
    coeffs = []
    for j, tj in enumerate(nodes):
        total = 0.0
        for x, w in gl:
            tau = (a + b) / 2 + (b - a) / 2 * x
            ell = 1.0
            for m, tm in enumerate(nodes):
                if m != j:
                    ell *= (tau - tm) / (tj - tm)
            total += w * ell / 2  # the mean over [a, b]
        coeffs.append(total)
    return coeffs


@torch.no_grad()
def sample(fn, noise, num_steps, solver="euler", shift=1.0, last_step=None):
    """Integrate dx/dt = fn(x, t) from noise at t = 0 to t = 1."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    ts = time_grid(num_steps, shift, last_step)
    x, history, t_sum = noise, [], ts[0]
    for i in range(num_steps):
        # The official AdamLMSampler's t is the float32 sum of the steps so far,
        # which is the grid time but for a last bit at 3 of the 270,900 times of N <= 300 steps.
        t = t_sum if solver.startswith("adams") else ts[i]
        h = float(ts[i + 1] - ts[i])
        t_sum = t_sum + (ts[i + 1] - ts[i])
        v = fn(x, t.to(x.device).expand(x.shape[0]))
        if solver == "euler":
            x = x + h * v
        elif solver == "heun":  # trapezoid on Euler's prediction: second order
            v2 = fn(x + h * v, ts[i + 1].to(x.device).expand(x.shape[0]))
            x = x + h / 2 * (v + v2)
        else:  # Adams: order ramps up from Euler, one order per step
            order = int(solver[-1])
            history = (history + [v])[-order:]
            coeffs = adams_coefficients(ts, i, order)
            x = x + h * sum(c * vj for c, vj in zip(coeffs, history[-len(coeffs):]))
    return x


def guided(model, y, y_null, scale, interval=(0.1, 1.0), **model_kwargs):
    """Classifier-free guidance in an interval, as fn(x, t) for `sample`.

    Inside lo < t < hi (strict, as the official code: with lo = 0 the first step is never guided)
    v = v_u + w (v_c - v_u), from one batched call on [uncond; cond]. Outside it only the
    conditional branch runs (the official code computes and discards the unconditional one).
    t is the time of the evaluation: the start of the step for Euler and Adams (the official
    samplers), the end of it for Heun's second evaluation. The test is in float32, as the
    official code compares its float32 t with the bounds: a grid time equal to float32(0.1), as
    at 20 steps, is not guided by (0.1, 1), which a float64 test would guide.
    """
    lo, hi = interval
    y, y_null = (y, y_null) if isinstance(y, tuple) else ((y,), (y_null,))  # labels, or (text, mask)
    both = tuple(torch.cat([u, c]) for u, c in zip(y_null, y))

    def fn(x, t):
        if scale != 1.0 and bool((t[0] > lo) & (t[0] < hi)):
            v_u, v_c = model(torch.cat([x, x]), torch.cat([t, t]), *both, **model_kwargs).chunk(2)
            return v_u + scale * (v_c - v_u)
        return model(x, t, *y, **model_kwargs)

    return fn
