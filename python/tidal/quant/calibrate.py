"""Calibrated int4 quantization: GPTQ (Frantar et al. 2022) and AWQ (Lin et al. 2023) in plain torch.

Both take a layer's float weight and what its inputs look like on calibration data, and produce codes
in :mod:`tidal.ops.quant`'s int4 layout (asymmetric, per-group fp32 scales and uint8 zero points,
``w = (code - zero) * scale``, codes 0..15) that lose less of the layer's output than rounding to
nearest (:func:`tidal.quant.linear.quantize_weight`) does.

- GPTQ: :class:`HessianAccumulator` gathers ``H = 2/N sum_t x_t x_t^T`` of a layer's inputs (from a
  forward hook); :func:`gptq_quantize` rounds the weight column by column and spreads each column's
  error over the columns not yet rounded, weighted by the inverse Hessian.
- AWQ: :func:`awq_search_scales` picks per-input-channel scales ``s`` from the mean activation
  magnitudes; :func:`apply_awq_scales` folds them into the weights (consumers' columns times ``s``,
  the producing norm or linear layer divided by ``s``), after which plain rounding to nearest of the
  scaled weights is the AWQ quantization.

Everything runs on the device of its inputs and computes in fp32 (fp64 tensors are folded in fp64).
"""

import math

import torch

from tidal.quant.linear import int4_scales_zeros, quantize_int4


class HessianAccumulator:
    """The GPTQ Hessian ``H = 2/N * sum_t x_t x_t^T`` [k, k] (fp32) of a layer's inputs ``x_t`` [k],
    accumulated over batches as a running mean::

        H <- H * N_old / N_new + 2 / N_new * X^T X        (X: the batch's N_new - N_old rows)

    ``N`` counts rows (tokens): a [batch, seq, k] input adds ``batch * seq``.

    Parameters
    ----------
    in_features : int
        ``k``, the layer's input size.
    device : torch.device or str, optional
        Where ``H`` lives; batches must be on the same device.

    Use :meth:`add_batch` directly, or register the accumulator itself as a forward hook
    (``layer.register_forward_hook(acc)``): it then adds the layer's first positional input.
    """

    def __init__(self, in_features: int, device=None):
        if in_features < 1:
            raise ValueError(f"in_features={in_features} must be positive")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [k, k]
        self.num_samples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Adds the rows of ``x`` [..., k] (any float dtype; taken in fp32)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x.shape={tuple(x.shape)} must end in in_features={self.in_features}")
        if x.device != self.hessian.device:
            raise ValueError(f"x is on {x.device} but the Hessian is on {self.hessian.device}")
        rows = x.detach().reshape(-1, self.in_features).float()
        if rows.shape[0] == 0:
            return
        total = self.num_samples + rows.shape[0]
        self.hessian *= self.num_samples / total
        rows = rows * math.sqrt(2.0 / total)
        self.hessian.addmm_(rows.t(), rows)
        self.num_samples = total

    def __call__(self, module, inputs, output) -> None:
        """The forward-hook form of :meth:`add_batch` (``inputs[0]`` is the layer's input)."""
        self.add_batch(inputs[0])


def _check_matrix(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {name}.shape={tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}.dtype={t.dtype} must be a floating-point dtype")


def _group_width(group_size: int | None, k: int) -> int:
    if group_size is None:
        return k
    if group_size < 1 or k % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide in_features={k}")
    return group_size


def _dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``(code - zero) * scale`` [n, k] in fp32 from unpacked codes [n, k] and [n, num_groups] parameters."""
    n, k = codes.shape
    g = k // scales.shape[1]
    w = (codes.float().reshape(n, -1, g) - zeros.float()[..., None]) * scales[..., None]
    return w.reshape(n, k)


def _inverse_upper_factor(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) of the damped Hessian."""
    hessian.diagonal().add_(damp_percent * hessian.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info.item() == 0:
            return upper
    raise ValueError(f"hessian is not positive definite after damping with damp_percent={damp_percent}; "
                     "raise damp_percent or calibrate on more tokens")


def _current_group(w, err, hinv, block_start, j, block_end, col, g) -> torch.Tensor:
    """The group's columns ``[col, col + g)`` of ``w`` [n, k] with every error so far applied: the
    current block's columns are updated eagerly, later blocks' columns still lack the lazy update
    from the ``j`` columns of this block rounded so far (``err`` [n, block], ``hinv`` [k, k])."""
    end = col + g
    if j == 0 or end <= block_end:
        return w[:, col:end]
    # NOTE: the reference code reads the later columns without this update; with block_size a
    # multiple of group_size (the defaults) no group crosses a block and both agree.
    beyond = w[:, block_end:end] - err[:, :j] @ hinv[block_start:block_start + j, block_end:end]
    return torch.cat((w[:, col:block_end], beyond), dim=1)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group_size: int | None = 128,
                  damp_percent: float = 0.01,
                  block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ int4 codes of a linear layer's weight, given the Hessian of its inputs.

    Minimizes the layer-output error ``||X W_q^T - X W^T||^2 = N/2 * tr((W_q - W) H (W_q - W)^T)``
    (``X`` [N, k] the calibration inputs) one input column at a time, in natural order (no
    act-order). With ``U`` the upper Cholesky factor of ``H^-1`` (after damping), rounding column
    ``i`` to ``q_i`` updates the columns after it::

        e = (w_i - q_i) / U[i, i]
        w_j <- w_j - e * U[i, j]          for j > i

    applied eagerly inside a block of ``block_size`` columns and once per block to the columns
    after it (lazy batch updates). When column ``i`` starts a group, the group's scale and zero point
    come from the group's current (error-updated) columns, by :func:`int4_scales_zeros`.
    Dead inputs (``H[i, i] == 0``: the input was always zero) get ``H[i, i] = 1`` and ``w[:, i] = 0``;
    then ``damp_percent * mean(diag(H))`` is added to the diagonal.

    Parameters
    ----------
    w : Tensor [n, k]
        The float weight (any float dtype, any device); not modified.
    hessian : Tensor [k, k]
        ``2/N * sum_t x_t x_t^T`` of the layer's inputs (:class:`HessianAccumulator`), on ``w``'s
        device; not modified. Its overall scale does not matter (the damping is relative).
    group_size : int or None
        Inputs per scale and zero point; must divide ``k``. None: one group per row.
    damp_percent : float
        The diagonal damping, a fraction of the mean diagonal (>= 0).
    block_size : int
        Columns per lazy batch update (>= 1); changes speed, not the result (up to rounding).

    Returns
    -------
    codes : Tensor [n, k] uint8
        Unpacked codes 0..15 (:func:`tidal.quant.linear.pack_int4` packs them).
    scales : Tensor [n, num_groups] float32
    zeros : Tensor [n, num_groups] uint8
    """
    _check_matrix("w", w)
    _check_matrix("hessian", hessian)
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian.shape={tuple(hessian.shape)} must be [{k}, {k}] for w.shape={tuple(w.shape)}")
    if hessian.device != w.device:
        raise ValueError(f"hessian is on {hessian.device} but w is on {w.device}")
    g = _group_width(group_size, k)
    if not (math.isfinite(damp_percent) and damp_percent >= 0):
        raise ValueError(f"damp_percent={damp_percent} must be a finite number >= 0")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")

    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_upper_factor(h, damp_percent)  # [k, k]

    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // g, dtype=torch.float32, device=w.device)
    zeros = torch.empty(n, k // g, dtype=torch.uint8, device=w.device)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[:, start:end]  # a view: its updates land in w
        block_hinv = hinv[start:end, start:end]
        err = torch.zeros(n, end - start, dtype=torch.float32, device=w.device)
        for j in range(end - start):
            col = start + j
            if col % g == 0:
                group = _current_group(w, err, hinv, start, j, end, col, g)
                scale, zero = int4_scales_zeros(group, None)  # [n, 1] each
                scales[:, col // g] = scale[:, 0]
                zeros[:, col // g] = zero[:, 0]
            code = quantize_int4(block[:, j:j + 1], scale, zero)  # [n, 1]
            codes[:, col] = code[:, 0]
            e = (block[:, j] - (code[:, 0].float() - zero[:, 0].float()) * scale[:, 0]) / block_hinv[j, j]
            block[:, j + 1:] -= e[:, None] * block_hinv[j, j + 1:][None, :]
            err[:, j] = e
        w[:, end:] -= err @ hinv[start:end, end:]
    return codes, scales, zeros


def _rtn_int4(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``w`` [n, k] rounded to nearest int4 codes and dequantized, in fp32."""
    scales, zeros = int4_scales_zeros(w, group_size)
    return _dequantize_int4(quantize_int4(w, scales, zeros), scales, zeros)


@torch.no_grad()
def awq_search_scales(w: torch.Tensor, x: torch.Tensor, group_size: int | None = 128, grid: int = 20) -> torch.Tensor:
    """AWQ's activation-aware per-input-channel scales ``s`` [k] for the layers that share input ``x``.

    With ``a = mean_t |x[t]|`` (per input channel), tries, for ``ratio`` in ``0, 1/grid, ...,
    (grid - 1)/grid``::

        s = clamp(a ** ratio, min=1e-4);   s = s / sqrt(max(s) * min(s))
        W_q = RTN_int4(W * s) / s          (columns scaled: (W * s)[:, i] = W[:, i] * s[i])
        loss = mean((x @ W_q^T - x @ W^T) ** 2)

    and returns the ``s`` of the smallest loss (ties keep the smaller ratio; ratio 0 is plain
    rounding to nearest, ``s = 1``). :func:`apply_awq_scales` folds ``s`` into the network.

    Parameters
    ----------
    w : Tensor [n, k]
        The weights of every linear layer fed by this input, concatenated by rows (e.g. q, k and v).
    x : Tensor [num_tokens, k] (or [..., k])
        Calibration inputs of those layers, on ``w``'s device.
    group_size : int or None
        The int4 group size the layers will be quantized at; must divide ``k``. None: whole rows.
    grid : int
        How many ratios to try (>= 1).

    Returns
    -------
    Tensor [k] float32 on ``w``'s device, all positive.
    """
    _check_matrix("w", w)
    n, k = w.shape
    if x.shape[-1] != k or not x.is_floating_point():
        raise ValueError(f"x must be float [..., {k}] for w.shape={tuple(w.shape)}, got {tuple(x.shape)} {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w is on {w.device}")
    x = x.detach().reshape(-1, k).float()
    if x.shape[0] == 0:
        raise ValueError(f"x.shape={tuple(x.shape)} holds no tokens")
    _group_width(group_size, k)
    if grid < 1:
        raise ValueError(f"grid={grid} must be positive")

    w = w.detach().float()
    act_mean = x.abs().mean(dim=0)  # [k]
    ref = x @ w.t()
    best_loss, best = math.inf, None
    for step in range(grid):
        s = act_mean.pow(step / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = (x @ (_rtn_int4(w * s, group_size) / s).t() - ref).pow(2).mean().item()
        if best is None or loss < best_loss:
            best_loss, best = loss, s
    return best


@torch.no_grad()
def apply_awq_scales(prev_weight: torch.Tensor, prev_is_norm: bool, weights: list[torch.Tensor], s: torch.Tensor,
                     prev_bias: torch.Tensor | None = None) -> None:
    """Folds AWQ scales ``s`` [k] into a producer and its consumers in place, so that the network's
    float output is unchanged (up to one rounding per element in the tensors' dtype)::

        consumers:          W[:, i] <- W[:, i] * s[i]        (each of ``weights``, [n_j, k])
        norm producer:      weight[i] <- weight[i] / s[i]    (``prev_weight`` [k]; ``prev_bias`` [k] too)
        linear producer:    P[i, :] <- P[i, :] / s[i]        (``prev_weight`` [k, k_in]; ``prev_bias`` [k] too)

    The producer's output channel ``i`` shrinks by ``s[i]`` and every consumer's input column ``i``
    grows by it. A norm producer must scale its output by ``weight`` (``x_hat * weight``, as RMSNorm
    and LayerNorm do). A linear producer must feed the consumers directly or through a map that commutes
    with a per-channel scale: ``up -> down`` (``act(gate) * up``: pass the up rows of a fused
    ``gate_up_proj`` weight as a view) and ``v -> o`` (attention mixes tokens, not channels: pass the
    v rows of ``qkv_proj``), but ``v -> o`` only where the number of query heads equals the number of
    KV heads, since with grouped-query attention one v channel feeds several ``o_proj`` columns; the
    caller decides.

    Parameters
    ----------
    prev_weight : Tensor
        The producer: a norm's weight [k] (``prev_is_norm``) or a linear layer's weight [k, k_in].
        Views (rows of a fused weight) are updated in place like any tensor.
    prev_is_norm : bool
        Whether ``prev_weight`` is a norm's weight.
    weights : list of Tensor [n_j, k]
        The consumers' weights.
    s : Tensor [k]
        Positive scales (:func:`awq_search_scales`).
    prev_bias : Tensor [k], optional
        The producer's bias, divided by ``s`` too.
    """
    if s.dim() != 1 or not s.is_floating_point():
        raise ValueError(f"s must be a 1-D float tensor, got s.shape={tuple(s.shape)} {s.dtype}")
    k = s.shape[0]
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("s must be finite and positive")
    if prev_is_norm and tuple(prev_weight.shape) != (k,):
        raise ValueError(f"prev_weight.shape={tuple(prev_weight.shape)} must be [{k}] (a norm's weight) "
                         f"for s.shape={tuple(s.shape)}")
    if not prev_is_norm and (prev_weight.dim() != 2 or prev_weight.shape[0] != k):
        raise ValueError(f"prev_weight.shape={tuple(prev_weight.shape)} must be [{k}, k_in] (a linear layer's "
                         f"weight) for s.shape={tuple(s.shape)}")
    if prev_bias is not None and tuple(prev_bias.shape) != (k,):
        raise ValueError(f"prev_bias.shape={tuple(prev_bias.shape)} must be [{k}]")
    for j, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weights[{j}].shape={tuple(w.shape)} must be [n, {k}]")

    def fold(t: torch.Tensor, by: torch.Tensor, divide: bool) -> None:
        wide = torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for fp64 tensors
        by = by.to(device=t.device, dtype=wide)
        t.copy_(t.to(wide) / by if divide else t.to(wide) * by)

    fold(prev_weight, s if prev_is_norm else s[:, None], divide=True)
    if prev_bias is not None:
        fold(prev_bias, s, divide=True)
    for w in weights:
        fold(w, s, divide=False)
