"""NumPy references for the routing algorithms (float64, one example at a time, explicit loops), written from the
papers' procedures independently of capsjax.routing."""

import numpy as np


def _softmax_rows(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _layer_norm(x, scale, offset, eps=1e-5):
    out = np.empty_like(x)
    for j in range(x.shape[0]):
        row = x[j]
        out[j] = (row - row.mean()) / np.sqrt(row.var() + eps) * scale + offset
    return out


def np_em(votes, acts, beta_u, beta_a, iterations, final_lambda=1.0, cost_scale=None, eps=1e-6):
    """EM routing, Procedure 1 of Hinton et al. (2018) with capsjax's choices: votes [B, n_in, n_out, *pose],
    acts [B, n_in], beta_u/beta_a [n_out] -> poses [B, n_out, *pose], activations [B, n_out], R [B, n_in, n_out]."""
    batch, n_in, n_out = votes.shape[:3]
    pose = votes.shape[3:]
    scale = n_out / n_in if cost_scale is None else cost_scale
    poses, activations, assignments = [], [], []
    for b in range(batch):
        v = votes[b].reshape(n_in, n_out, -1).astype(np.float64)
        h = v.shape[-1]
        r = np.full((n_in, n_out), 1.0 / n_out)
        for t in range(iterations):
            lam = final_lambda * (1 - 0.95 ** (t + 1))
            mu, var, a = np.zeros((n_out, h)), np.zeros((n_out, h)), np.zeros(n_out)
            for j in range(n_out):  # M-step
                w = np.array([r[i, j] * acts[b, i] for i in range(n_in)])
                total = w.sum()
                mu[j] = (w[:, None] * v[:, j]).sum(0) / (total + eps)
                var[j] = (w[:, None] * (v[:, j] - mu[j]) ** 2).sum(0) / (total + eps) + eps
                cost = sum((beta_u[j] + np.log(np.sqrt(var[j, k]))) * total * scale for k in range(h))
                a[j] = 1 / (1 + np.exp(-lam * (beta_a[j] - cost)))
            if t == iterations - 1:
                break
            for i in range(n_in):  # E-step: R_ij = a_j p_ij / sum_k a_k p_ik, with Gaussian densities
                p = np.array([np.prod(np.exp(-((v[i, j] - mu[j]) ** 2) / (2 * var[j])) / np.sqrt(2 * np.pi * var[j]))
                              for j in range(n_out)])  # fmt: skip
                r[i] = a * p / (a * p).sum()
        poses.append(mu.reshape(n_out, *pose))
        activations.append(a)
        assignments.append(r.copy())
    return np.stack(poses), np.stack(activations), np.stack(assignments)


def np_inverted_step(u, v, scale, offset):
    """One iteration of inverted dot-product attention for one example: u [n_in, n_out, d], v [n_out, d] or None."""
    n_in, n_out, d = u.shape
    r = np.full((n_in, n_out), 1.0 / n_out)
    if v is not None:
        for i in range(n_in):
            r[i] = _softmax_rows(np.array([u[i, j] @ v[j] for j in range(n_out)]) / np.sqrt(d))
    s = sum(r[i][:, None] * u[i] for i in range(n_in))
    return _layer_norm(s, scale, offset), r


def np_inverted(u_hat, iterations, scale, offset):
    """Procedure 1 of Tsai et al. (2020): u_hat [B, n_in, n_out, d] -> v [B, n_out, d], r [B, n_in, n_out]."""
    vs, rs = [], []
    for b in range(u_hat.shape[0]):
        v = None
        for _ in range(iterations):
            v, r = np_inverted_step(u_hat[b].astype(np.float64), v, scale, offset)
        vs.append(v)
        rs.append(r)
    return np.stack(vs), np.stack(rs)


def np_concurrent(x, weights, iterations, scales, offsets):
    """Concurrent routing of one example through linear capsule layers: x [n_0, d_0], weights[l] [n_l, n_l+1, d, d_l]
    (votes u_j|i = W_ij x_i) -> the poses of every layer."""
    def votes(l, below):
        return np.einsum("ijdk,ik->ijd", weights[l], below)

    poses, below = [], x
    for l in range(len(weights)):
        below, _ = np_inverted_step(votes(l, below), None, scales[l], offsets[l])
        poses.append(below)
    for _ in range(iterations - 1):
        inputs = [x] + poses[:-1]
        poses = [np_inverted_step(votes(l, inputs[l]), poses[l], scales[l], offsets[l])[0] for l in range(len(weights))]
    return poses


def np_self_attention(u_hat, log_priors):
    """Efficient-CapsNet's routing, forming each parent's self-attention matrix A_j = U_j U_j^T / sqrt(d):
    u_hat [B, n_in, n_out, d], log_priors [n_in, n_out] -> v [B, n_out, d], c [B, n_in, n_out]."""
    batch, n_in, n_out, d = u_hat.shape
    vs, cs = [], []
    for b in range(batch):
        u = u_hat[b].astype(np.float64)
        logits = np.zeros((n_in, n_out))
        for j in range(n_out):
            a = u[:, j] @ u[:, j].T / np.sqrt(d)  # [n_in, n_in]
            logits[:, j] = a.sum(1)
        c = _softmax_rows(logits)
        v = np.zeros((n_out, d))
        for j in range(n_out):
            s = sum(u[i, j] * (c[i, j] + log_priors[i, j]) for i in range(n_in))
            n = np.sqrt((s**2).sum() + 1e-7)
            v[j] = (1 - np.exp(-n)) * s / n
        vs.append(v)
        cs.append(c)
    return np.stack(vs), np.stack(cs)
