"""NumPy references for the tests, written from the paper, independently of capsjax's code (float64, explicit loops)."""

import numpy as np


def np_squash(s, eps=1e-7):
    """Paper eq. 1 with eps inside the square root, over the last axis."""
    n2 = (s**2).sum(-1, keepdims=True)
    return n2 / (1 + n2) * s / np.sqrt(n2 + eps)


def np_routing(u_hat, iterations, bias=None):
    """Procedure 1 with explicit per-example loops: u_hat [B, n_in, n_out, d] -> v [B, n_out, d], c [B, n_in, n_out]."""
    batch, n_in, n_out, d = u_hat.shape
    vs, cs = [], []
    for b_idx in range(batch):
        u = u_hat[b_idx].astype(np.float64)
        logits = np.zeros((n_in, n_out))
        for r in range(iterations):
            c = np.exp(logits - logits.max(1, keepdims=True))
            c /= c.sum(1, keepdims=True)  # softmax over the parents
            s = np.zeros((n_out, d)) if bias is None else np.array(bias, np.float64)
            for i in range(n_in):
                s = s + c[i][:, None] * u[i]
            v = np_squash(s)
            if r < iterations - 1:
                for i in range(n_in):
                    logits[i] += (u[i] * v).sum(-1)
        vs.append(v)
        cs.append(c)
    return np.stack(vs), np.stack(cs)


def np_margin(lengths, labels, m_plus=0.9, m_minus=0.1, lam=0.5):
    """Paper eq. 4 summed over classes; labels are class ids."""
    t = np.eye(lengths.shape[-1])[labels]
    return (t * np.maximum(0, m_plus - lengths) ** 2 + lam * (1 - t) * np.maximum(0, lengths - m_minus) ** 2).sum(-1)


def np_conv_valid(x, k, stride):
    """VALID cross-correlation: x [B, H, W, C_in], k [kh, kw, C_in, C_out] -> [B, oh, ow, C_out]."""
    kh, kw, _, cout = k.shape
    batch, h, w, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((batch, oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j] = np.tensordot(patch, k, axes=([1, 2, 3], [0, 1, 2]))
    return out
