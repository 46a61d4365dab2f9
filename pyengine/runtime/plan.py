"""The decode step recorded once from the model's own Python code, replayed per token in C++.

A model defines its architecture once, in `hidden_states` (and `logits`). To build the fast decode
step, that code runs one time for a single new token per sequence with a recording backend, cache
and step standing in for the real ones: every backend op appends an instruction, and the tensors
flowing between ops are symbolic views into numbered buffers (per batch row: a run of floats at an
offset). `_C.DecodePlan` then replays the instructions each token over buffers it owns, calling the
same kernels the fused backends call op by op, so the numbers match that path.

Recording is strict: anything the plan cannot express (an op it does not know, arithmetic on a
tensor, indexing, a view that is not a run of each row) raises PlanRecordingError naming it, and the
model then decodes op by op.
"""
from __future__ import annotations

import math

import torch

RECORD_BATCH = 2  # rows while recording: a reshape that mixed batch rows into features would fail


class PlanRecordingError(NotImplementedError):
    """The model's code did something the decode plan cannot record."""


class _Buffer:
    def __init__(self, width: int):
        self.width = width


class PlanTensor:
    """A symbolic [B, 1, ...] tensor: per batch row, prod(shape[2:]) floats at `offset` in `buffer`."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, buffer: _Buffer, offset: int, shape: tuple):
        self.buffer, self.offset, self._shape = buffer, offset, tuple(int(s) for s in shape)
        self.width = math.prod(self._shape[2:])

    # --- what a model may read or reshape ---
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    def size(self, dim=None):
        return self.shape if dim is None else self._shape[dim]

    def dim(self) -> int:
        return len(self._shape)

    ndim = property(dim)

    @property
    def dense(self) -> bool:
        return self.offset == 0 and self.width == self.buffer.width

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if len(shape) < 2 or tuple(shape[:2]) != self._shape[:2] or list(shape).count(-1) > 1:
            raise PlanRecordingError(f"reshape of {tuple(self._shape)} to {tuple(shape)}: the plan keeps the leading "
                                     f"(batch, tokens) dims {self._shape[:2]} and reshapes only each row")
        inner = list(shape[2:])
        if -1 in inner:
            known = math.prod(s for s in inner if s != -1)
            inner[inner.index(-1)] = self.width // known if known else 0
        if math.prod(inner) != self.width:
            raise PlanRecordingError(f"reshape of {tuple(self._shape)} to {tuple(shape)}: sizes differ")
        return PlanTensor(self.buffer, self.offset, self._shape[:2] + tuple(inner))

    view = reshape

    def contiguous(self):
        return self if self.dense else _active_recorder().copy(self)

    def split(self, sizes, dim=-1):
        dim = self._row_dim(dim, "split")
        if isinstance(sizes, int):
            sizes = [sizes] * (-(-self._shape[dim] // sizes))
            sizes[-1] = self._shape[dim] - sizes[0] * (len(sizes) - 1)
        if sum(sizes) != self._shape[dim]:
            raise PlanRecordingError(f"split of dim {dim} ({self._shape[dim]}) into {list(sizes)}")
        pieces, start = [], 0
        for size in sizes:
            pieces.append(self._piece(dim, start, size))
            start += size
        return tuple(pieces)

    def chunk(self, chunks, dim=-1):
        d = self._row_dim(dim, "chunk")
        if self._shape[d] % chunks:
            raise PlanRecordingError(f"chunk of dim {d} ({self._shape[d]}) into {chunks} unequal pieces")
        return self.split(self._shape[d] // chunks, dim)

    def unbind(self, dim=0):
        dim = self._row_dim(dim, "unbind")
        return tuple(self._piece(dim, i, 1, drop=True) for i in range(self._shape[dim]))

    def _row_dim(self, dim: int, what: str) -> int:
        dim = dim % len(self._shape)
        if dim < 2:
            raise PlanRecordingError(f"{what} along dim {dim} of {tuple(self._shape)}: the plan splits only within rows")
        return dim

    def _piece(self, dim: int, start: int, size: int, drop: bool = False):
        if any(s != 1 for s in self._shape[2:dim]):
            raise PlanRecordingError(f"a slice of dim {dim} of {tuple(self._shape)} is not one run of each row "
                                     f"(copy it with .contiguous() first, or slice an outer dim)")
        after = math.prod(self._shape[dim + 1:])
        shape = list(self._shape)
        if drop:
            del shape[dim]
        else:
            shape[dim] = size
        return PlanTensor(self.buffer, self.offset + start * after, tuple(shape))

    # --- anything else is refused by name ---
    def __getattr__(self, name):
        raise PlanRecordingError(f"tensor method or attribute {name!r} (on a {tuple(self._shape)} activation)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise PlanRecordingError(f"torch function {getattr(func, '__name__', func)!r} on an activation; "
                                 "activations may only pass through backend ops")

    def __repr__(self):
        return f"PlanTensor(shape={tuple(self._shape)}, offset={self.offset}, buffer width={self.buffer.width})"


def _refused_operator(name: str):
    def refuse(self, *args):
        raise PlanRecordingError(f"operator {name} on an activation; activations may only pass through backend ops")
    return refuse


# Arithmetic, indexing and conversions on an activation: the plan has no instruction for them.
for _name in ("add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "truediv", "rtruediv", "itruediv",
              "matmul", "rmatmul", "neg", "pow", "getitem", "setitem", "float", "int", "bool"):
    setattr(PlanTensor, f"__{_name}__", _refused_operator(f"__{_name}__"))
del _name


def _active_recorder() -> "_Recorder":
    if _Recorder.active is None:
        raise PlanRecordingError("an activation used after its plan was recorded")
    return _Recorder.active


class _Tokens:
    """The step's token ids, [B, 1]: readable only by the embedding op."""

    def __init__(self, batch: int):
        self.shape = torch.Size((batch, 1))

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def __getattr__(self, name):
        raise PlanRecordingError(f"token ids: {name!r} (the ids may only go to the embedding op)")


class _CacheLayer:
    def __init__(self, kind: str, layer: int):
        self.kind, self.layer = kind, layer

    def __getattr__(self, name):
        raise PlanRecordingError(f"KV cache layer: {name!r} (a cache layer may only go to attention)")


class _CacheSide:
    def __init__(self, kind: str, layers: int):
        self.kind, self.layers = kind, layers

    def __getitem__(self, layer):
        if not isinstance(layer, int) or not 0 <= layer < self.layers:
            raise PlanRecordingError(f"KV cache {self.kind}[{layer!r}]: expected a layer index in [0, {self.layers})")
        return _CacheLayer(self.kind, layer)


class _RecordingCache:
    def __init__(self, config):
        self.num_layers, self.kv_heads, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.keys, self.values = _CacheSide("k", self.num_layers), _CacheSide("v", self.num_layers)

    def write(self, layer, k, v, start, uniform_start):
        _Recorder.active.write_kv(layer, k, v)

    def __getattr__(self, name):
        raise PlanRecordingError(f"KV cache attribute {name!r}")


class _RecordingStep:
    """Stands in for backends.Step: q_start / uniform_start only pass through to cache.write (the
    replay writes at each row's position), the rest is the ops' business."""

    q_start = None
    uniform_start = None

    def __getattr__(self, name):
        raise PlanRecordingError(f"step.{name} read by the model (per-step values must go through backend ops)")


def _linear_shape(w) -> tuple[int, int]:
    weight = getattr(w, "qweight", None)
    if weight is None:
        weight = getattr(w, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise PlanRecordingError(f"linear weights of type {type(w).__name__}: expected .weight or .qweight [out, in]")
    return tuple(weight.shape)


class _Recorder:
    """The recording backend: each op appends an instruction over symbolic buffers."""

    active: "_Recorder | None" = None

    def __init__(self, config):
        self.config = config
        self.instructions: list[dict] = []
        self.rope_table_names: list[str] = []
        self.label: str | None = None  # overrides the op name as the profile label (lm_head)

    # --- plumbing ---
    def _new(self, shape) -> PlanTensor:
        return PlanTensor(_Buffer(math.prod(shape[2:])), 0, shape)

    def _emit(self, op: str, **fields):
        fields = {k: v for k, v in fields.items() if v is not None}
        fields["op"] = op
        if self.label is not None:
            fields["label"] = self.label
        self.instructions.append(fields)

    @staticmethod
    def _tensor(t, what: str) -> PlanTensor:
        if not isinstance(t, PlanTensor):
            raise PlanRecordingError(f"{what}: expected an activation of this step, got {type(t).__name__}")
        return t

    @staticmethod
    def _weight(w, what: str, shape: tuple) -> torch.Tensor:
        if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or w.device.type != "cpu" \
                or tuple(w.shape) != shape:
            got = f"{w.dtype} {tuple(w.shape)} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise PlanRecordingError(f"{what}: expected an fp32 CPU tensor of shape {shape}, got {got}")
        return w.contiguous()

    def _table(self, table, what: str, width: int | None) -> torch.Tensor:
        rows = table.shape[0] if isinstance(table, torch.Tensor) and table.dim() == 2 else -1
        return self._weight(table, what, (rows, table.shape[1] if width is None and rows >= 0 else width))

    def _dense(self, t: PlanTensor) -> PlanTensor:
        return t if t.dense else self.copy(t)

    def copy(self, t: PlanTensor) -> PlanTensor:
        out = self._new(t.shape)
        self._emit("copy", x=t, out=out)
        return out

    # --- the backend's ops (signatures as TorchBackend's) ---
    def embedding(self, ids, table, scale=None):
        if not isinstance(ids, _Tokens):
            raise PlanRecordingError("embedding: the plan looks up only the step's token ids")
        table = self._table(table, "embedding table", None)
        out = self._new(tuple(ids.shape) + (table.shape[1],))
        self._emit("embedding", out=out, weight=table, scalar=None if scale is None else float(scale))
        return out

    def add_position_embedding(self, x, table, step):
        x = self._tensor(x, "add_position_embedding x")
        table = self._table(table, "position embedding table", x.width)
        self._emit("add_position_embedding", x=x, weight=table)
        return x

    def rms_norm(self, x, weight, eps):
        x = self._tensor(x, "rms_norm x")
        return self._norm("rms_norm", x, None, weight, None, eps)

    def add_rms_norm(self, residual, delta, weight, eps):
        return self._norm("add_rms_norm", self._tensor(residual, "add_rms_norm residual"),
                          self._tensor(delta, "add_rms_norm delta"), weight, None, eps)

    def layer_norm(self, x, weight, bias, eps):
        return self._norm("layer_norm", self._tensor(x, "layer_norm x"), None, weight, bias, eps)

    def add_layer_norm(self, residual, delta, weight, bias, eps):
        return self._norm("add_layer_norm", self._tensor(residual, "add_layer_norm residual"),
                          self._tensor(delta, "add_layer_norm delta"), weight, bias, eps)

    def _norm(self, op, x, delta, weight, bias, eps):
        dim = x.shape[-1]
        if delta is not None and delta.shape != x.shape:
            raise PlanRecordingError(f"{op}: delta {tuple(delta.shape)} and residual {tuple(x.shape)} differ")
        weight = self._weight(weight, f"{op} weight", (dim,))
        bias = None if bias is None else self._weight(bias, f"{op} bias", (dim,))
        out = self._new(x.shape)
        self._emit(op, x=x, y=delta, out=out, weight=weight, bias=bias, dim=dim, scalar=float(eps))
        return out

    def linear(self, x, w):
        x = self._dense(self._tensor(x, "linear x"))
        n_out, n_in = _linear_shape(w)
        if x.shape[-1] != n_in or x.dim() != 3:
            raise PlanRecordingError(f"linear: input {tuple(x.shape)} does not match weights [{n_out}, {n_in}]")
        out = self._new(x.shape[:-1] + (n_out,))
        self._emit("linear", x=x, out=out, linear=w)
        return out

    def rope(self, x, step, table="default"):
        x = self._tensor(x, "rope x")
        if x.dim() != 4:
            raise PlanRecordingError(f"rope: expected [batch, tokens, heads, head_dim], got {tuple(x.shape)}")
        if table not in self.rope_table_names:
            self.rope_table_names.append(table)
        out = self._new(x.shape)
        self._emit("rope", x=x, out=out, dim=x.shape[-1], table=self.rope_table_names.index(table))
        return out

    def write_kv(self, layer, k, v):
        k, v = self._tensor(k, "cache.write k"), self._tensor(v, "cache.write v")
        c = self.config
        want = (RECORD_BATCH, 1, c.num_kv_heads, c.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise PlanRecordingError(f"cache.write: k {tuple(k.shape)}, v {tuple(v.shape)}; expected {want}")
        self._emit("write_kv", x=k, y=v, layer=int(layer), kv_heads=c.num_kv_heads, dim=c.head_dim)

    def attention(self, q, k_cache, v_cache, step, scale, window=0):
        q = self._dense(self._tensor(q, "attention q"))
        if not (isinstance(k_cache, _CacheLayer) and isinstance(v_cache, _CacheLayer) and k_cache.kind == "k"
                and v_cache.kind == "v" and k_cache.layer == v_cache.layer):
            raise PlanRecordingError("attention: the caches must be cache.keys[i] and cache.values[i] of one layer")
        c = self.config
        if q.dim() != 4 or q.shape[-1] != c.head_dim:
            raise PlanRecordingError(f"attention: q {tuple(q.shape)} is not [batch, tokens, heads, {c.head_dim}]")
        out = self._new(q.shape)
        self._emit("attention", x=q, out=out, layer=k_cache.layer, heads=q.shape[2], kv_heads=c.num_kv_heads,
                   dim=c.head_dim, window=int(window), scalar=float(scale))
        return out

    def silu_mul(self, gate, up):
        return self._gated("silu_mul", gate, up)

    def gelu_mul(self, gate, up):
        return self._gated("gelu_mul", gate, up)

    def _gated(self, op, gate, up):
        gate, up = self._tensor(gate, f"{op} gate"), self._tensor(up, f"{op} up")
        if gate.shape != up.shape:
            raise PlanRecordingError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        out = self._new(gate.shape)
        self._emit(op, x=gate, y=up, out=out)
        return out

    def gelu(self, x):
        x = self._tensor(x, "gelu x")
        out = self._new(x.shape)
        self._emit("gelu", x=x, out=out)
        return out

    def softcap(self, x, cap):
        x = self._tensor(x, "softcap x")
        out = self._new(x.shape)
        self._emit("softcap", x=x, out=out, scalar=float(cap))
        return out

    def __getattr__(self, name):
        raise PlanRecordingError(f"backend op {name!r} is not one the decode plan can record")


def _assign_buffers(instructions: list[dict], output: _Buffer) -> tuple[list[int], dict]:
    """Physical buffers for the symbolic ones: a buffer's slot is reused, by one of the same width,
    once its last reader has run (every layer then works in the same few warm buffers, as a
    hand-written decoder would). The output keeps a slot of its own (step() binds it to logits)."""
    last_use = {}
    for n, ins in enumerate(instructions):
        for key in ("x", "y", "out"):
            if key in ins:
                last_use[ins[key].buffer] = n
    widths, slot_of, free = [output.width], {output: 0}, {}
    for n, ins in enumerate(instructions):
        for key in ("x", "y", "out"):
            buf = ins[key].buffer if key in ins else None
            if buf is not None and buf not in slot_of:
                pool = free.get(buf.width)
                if pool:
                    slot_of[buf] = pool.pop()
                else:
                    slot_of[buf] = len(widths)
                    widths.append(buf.width)
        for buf, last in last_use.items():
            if last == n and buf is not output:
                free.setdefault(buf.width, []).append(slot_of[buf])
    return widths, slot_of


class DecodePlan:
    """The recorded step and its C++ replay. step() takes the cache and the model's rotary tables
    (names in `rope_table_names`, passed in that order)."""

    def __init__(self, native, rope_table_names: list[str], instructions: list[dict]):
        self.native, self.rope_table_names, self.instructions = native, rope_table_names, instructions

    def step(self, tokens, cache, rope_tables: dict, logits, **tail):
        tables = [rope_tables[name] for name in self.rope_table_names]
        self.native.step(tokens, cache.keys, cache.values, cache.lengths, tables, logits, **tail)

    # the per-label profile of the replay (benchmarks/cpu_roofline.py)
    def set_profiling(self, on: bool):
        self.native.set_profiling(on)

    def reset_profile(self):
        self.native.reset_profile()

    def profile(self) -> dict:
        return self.native.profile()


def record_decode_plan(model) -> DecodePlan:
    """Records `model`'s decode step (hidden_states, then logits) for one token per sequence and builds
    its C++ replay. Raises PlanRecordingError naming what it could not record."""
    from pyengine import _C

    c = model.config
    recorder = _Recorder(c)
    real_backend = model.backend
    _Recorder.active, model.backend = recorder, recorder
    try:
        hidden = model.hidden_states(_Tokens(RECORD_BATCH), _RecordingCache(c), _RecordingStep())
        recorder.label = "lm_head"
        logits = recorder._dense(recorder._tensor(model.logits(hidden), "logits"))
    finally:
        _Recorder.active, model.backend = None, real_backend
    if tuple(logits.shape) != (RECORD_BATCH, 1, c.vocab_size):
        raise PlanRecordingError(f"logits: expected {(RECORD_BATCH, 1, c.vocab_size)}, got {tuple(logits.shape)}")
    widths, slot_of = _assign_buffers(recorder.instructions, logits.buffer)
    native_instructions = []
    for ins in recorder.instructions:
        native = dict(ins)
        for key in ("x", "y", "out"):
            if key in native:
                v = native[key]
                native[key] = (slot_of[v.buffer], v.offset, v.width)
        native_instructions.append(native)
    native = _C.DecodePlan(vocab_size=c.vocab_size, buffer_widths=widths, output_buffer=0,
                           instructions=native_instructions, num_rope_tables=len(recorder.rope_table_names))
    return DecodePlan(native, list(recorder.rope_table_names), native_instructions)
