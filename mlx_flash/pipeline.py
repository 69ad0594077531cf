"""Pipeline parallelism: a flash model's layers over several machines, with MLX's `mx.distributed`.

    python -m mlx_flash.split --model models/opt-6.7b --shards 2          # one folder per rank
    python -m mlx_flash.launch --ranks 2 -- generate --model models/opt-6.7b --mode flash --pipeline
    python -m mlx_flash.launch --hosts 10.0.0.1,10.0.0.2 -- generate ... --pipeline   (mlx.launch's ring)

Rank r of N holds a contiguous run of layers (mlx_flash.split), their KV cache, and runs their FFNs
dense or in flash mode with its own --dram-budget and its own SSD; rank 0 also holds the embeddings,
the last rank the final norm and the LM head. The model is the whole architecture's (mlx-lm's class,
or ours for OPT), so every architecture pipelines the same way:
  - a layer another rank runs is a PassThrough: its input goes on untouched and its cache only counts
    the tokens (the models build the attention mask from cache[0]'s offset);
  - the rank's first layer takes its input from rank r-1 (`recv`: the embeddings computed above it
    are never evaluated), its last layer sends its output to rank r+1;
  - the last rank computes the logits and samples; the token reaches every rank in an all_sum (the
    others add 0), so rank 0 embeds it next and every rank stops at the same token.
A token is one trip through the ranks: they take turns, they do not overlap (one sequence). What a
second machine buys is memory and SSD bandwidth: each rank holds and reads only its own layers.

Faults: a peer that exits closes its sockets, and the next distributed operation raises at once; a
peer that stops answering without closing them is caught by a watchdog process (mlx_flash.watchdog,
--pipeline-timeout). Either way the rank prints one line naming the rank and exits non-zero
(mlx_flash.launch stops the rest).
"""

import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import FlashError
from .flash.attach import attach_flash, resident_facts
from .flash.budget import UNBUDGETED_PREFILL_STEP
from .flash.prefill import numpy_linears, use_numpy
from .format import RESIDENT_FILE, FlashConfig
from .load import attach_dense, is_flash_folder
from .models.architectures import architecture
from .sources import instantiate, load_tokenizer, quantize_like
from .split import is_tied, owns, rank_folder
from .system import release_pages
from .watchdog import Watchdog

DTYPES = (mx.float32, mx.float16, mx.bfloat16)  # what a hidden state can be, by the code sent for it
DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for a peer (a whole prompt chunk of the ranks before it fits)


class PassThrough(nn.Module):
    """A layer that another rank runs: the hidden state goes through; the cache counts the tokens.
    It keeps the layer's plain attributes (a model's make_cache reads some: Llama's use_sliding)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for k, v in vars(layer).items():
            if not k.startswith("_"):
                object.__setattr__(self, k, v)

    def __call__(self, x, mask=None, cache=None, *args, **kwargs):
        if cache is not None:
            cache.offset += x.shape[1]  # (B, L, d): no keys stored
        return x


class Boundary(nn.Module):
    """The rank's first layer (input received from the previous rank) and/or its last (output sent on)."""

    def __init__(self, layer: nn.Module, link: "Link", receive: bool, send: bool):
        super().__init__()
        self.layer = layer
        self.link, self.receive, self.send = link, receive, send

    def __getattr__(self, key):  # the layer's plain attributes (make_cache reads some)
        if key != "layer" and "layer" in self:
            return getattr(self["layer"], key)
        return super().__getattr__(key)

    def __call__(self, x, *args, **kwargs):
        if self.receive:
            x = self.link.recv(x)
        y = self.layer(x, *args, **kwargs)
        if self.send:
            self.link.send(y)
        return y


class Link:
    """This rank's place in the pipeline and its traffic: activations in from rank-1, out to rank+1,
    each sampled token from the last rank to all. Every wait is watched (`timeout` seconds)."""

    def __init__(self, group, timeout: float = DEFAULT_TIMEOUT):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.timeout = timeout
        self.last = self.rank == self.size - 1
        self.pending: List[mx.array] = []
        self.recv_s = self.send_s = self.token_s = 0.0  # waits: for activations, for a send, for the token
        self.bytes_sent = self.bytes_received = 0
        self.dtype, self.announced = None, False  # of the hidden states received; whether ours were named
        self.watchdog = Watchdog()

    @contextmanager
    def waiting(self, what: str, peer: Optional[int]):
        """Within: a distributed operation with `peer` (None: any rank), watched by the watchdog."""
        self.watchdog.arm(self.timeout, f"error: rank {self.rank}: {what}: no answer within {self.timeout:g} s "
                                        f"(--pipeline-timeout): it stopped or cannot be reached")
        try:
            yield
        except RuntimeError as e:  # the ring backend's "connection to a peer was lost"
            who = f"rank {peer}" if peer is not None else "another rank"
            raise FlashError(f"rank {self.rank}: {what}: lost the connection to {who} (it stopped or cannot be "
                             f"reached): {str(e).splitlines()[0]}") from None
        finally:
            self.watchdog.disarm()

    def other(self) -> Optional[int]:
        return 1 - self.rank if self.size == 2 else None

    def recv(self, like: mx.array) -> mx.array:
        """The previous rank's hidden state, shaped as `like` (what the embeddings here would give). Its dtype
        is the previous layer's output's, which may differ from the embeddings' (float16 embeddings meet
        float32 norms in the built-in model): the previous rank names it once, before the first one."""
        t = time.perf_counter()
        with self.waiting(f"waiting for rank {self.rank - 1}'s activations", self.rank - 1):
            if self.dtype is None:
                code = mx.distributed.recv((1,), mx.int32, self.rank - 1, group=self.group).item()
                self.dtype = DTYPES[code]
            x = mx.distributed.recv(like.shape, self.dtype, self.rank - 1, group=self.group)
            mx.eval(x)
        self.recv_s += time.perf_counter() - t
        self.bytes_received += x.nbytes
        return x

    def send(self, y: mx.array):
        if not self.announced:  # the dtype first, once (sent now: the sends of a pass have no order)
            with self.waiting(f"sending to rank {self.rank + 1}", self.rank + 1):
                mx.eval(mx.distributed.send(mx.array([DTYPES.index(y.dtype)], mx.int32), self.rank + 1,
                                            group=self.group))
            self.announced = True
        self.pending.append(mx.distributed.send(y, self.rank + 1, group=self.group))
        self.bytes_sent += y.nbytes

    def flush(self):
        """Perform the sends of this forward pass (its compute is evaluated before, by the caller)."""
        if not self.pending:
            return
        t = time.perf_counter()
        with self.waiting(f"sending activations to rank {self.rank + 1}", self.rank + 1):
            mx.eval(self.pending)
        self.send_s += time.perf_counter() - t
        self.pending = []

    def token(self, token: Optional[mx.array]) -> int:
        """The last rank's sampled token, on every rank."""
        mine = token.astype(mx.int32) if token is not None else mx.zeros((1,), mx.int32)
        t = time.perf_counter()
        what = f"waiting for rank {self.size - 1}'s next token" if not self.last else "passing the token on"
        with self.waiting(what, self.other()):
            out = mx.distributed.all_sum(mine, group=self.group).item()
        self.token_s += time.perf_counter() - t
        self.bytes_sent += mine.nbytes if self.last else 0
        return out

    def control(self, go: int, watched: bool = True) -> int:
        """Rank 0's word to every rank: its `go` (the others' count for nothing)."""
        mine = mx.array([go if self.rank == 0 else 0], mx.int32)
        with self.waiting("waiting for rank 0", 0) if watched else nullcontext():
            return mx.distributed.all_sum(mine, group=self.group).item()

    def gather(self, row: List[float]) -> np.ndarray:
        """(size, len(row)): every rank's row (the others' rows are zeros in each contribution)."""
        a = np.zeros((self.size, len(row)), np.float64)
        a[self.rank] = row
        with self.waiting("gathering the ranks' figures", self.other()):
            return np.array(mx.distributed.all_sum(mx.array(a.astype(np.float32)), group=self.group))


def start(timeout: float = DEFAULT_TIMEOUT) -> Link:
    """Join the ranks started by mlx.launch (or mlx_flash.launch); refuse a single process."""
    if timeout <= 0:
        raise FlashError("--pipeline-timeout must be positive")
    group = mx.distributed.init()
    if group.size() < 2:
        raise FlashError("--pipeline needs several ranks: start it with python -m mlx_flash.launch --ranks 2 -- "
                         "generate ... --pipeline (or mlx.launch)")
    return Link(group, timeout)


# MARK: - one rank's part of the model


def rank_model_folder(model, rank: int, ranks: int) -> Path:
    """The folder this rank runs: `model` itself when it is a rank's folder, else model-rank<r>-of-<N>."""
    path = Path(model)
    cfg = FlashConfig.load(path) if is_flash_folder(path) else None
    if cfg is None or not cfg.pipeline:
        own = rank_folder(path, rank, ranks)
        if is_flash_folder(own):
            return own
        if cfg is None:
            raise FlashError(f"--pipeline: neither {path} nor {own} is a flash model folder")
        raise FlashError(f"{path} holds the whole model: split it for {ranks} ranks first, python -m mlx_flash.split "
                         f"--model {path} --shards {ranks}")
    return path


def check_rank(folder: Path, cfg: FlashConfig, rank: int, ranks: int):
    p = cfg.pipeline
    if p is None:
        raise FlashError(f"{folder} is not a rank's folder: python -m mlx_flash.split makes them")
    if p["ranks"] != ranks:
        raise FlashError(f"{folder} is rank {p['rank']} of a {p['ranks']}-rank split, but {ranks} ranks were started")
    if p["rank"] != rank:
        raise FlashError(f"{folder} holds rank {p['rank']}'s layers {p['layers'][0]}-{p['layers'][1] - 1}, not this "
                         f"rank's: give every rank its own folder ({rank_folder('DIR', rank, ranks).name} for this one)")


def _plan_config(cfg: FlashConfig) -> FlashConfig:
    """The config the rank's budget plan reads: the model's, with only this rank's layers (KV cache)."""
    mc = {**cfg.model_config}
    nested = architecture(mc).nested
    if nested:
        mc[nested] = {**mc[nested], "num_hidden_layers": cfg.n_layers}
    else:
        mc["num_hidden_layers"] = cfg.n_layers
    return replace(cfg, model_config=mc)


class Stage(nn.Module):
    """What the FFN attachers see of a rank: its own layers (the model's modules, renumbered from 0)."""

    def __init__(self, layers: list, ffn_spec):
        super().__init__()
        self.layers = layers
        self.ffn_spec = ffn_spec


def load_rank(folder: Path, rank: int, ranks: int, mode: str = "dense", **flash_options):
    """The whole model with this rank's layers, embeddings or head loaded and every other layer a
    PassThrough; returns (model, cfg, stage). Weights not held stay unevaluated (never allocated)."""
    cfg = FlashConfig.load(folder)
    check_rank(folder, cfg, rank, ranks)
    cfg.check_files(folder)
    start, end = cfg.pipeline["layers"]
    model = instantiate(cfg.model_config)
    for i in range(len(model.layers)):
        if start <= i < end:
            model.layers[i].mlp = nn.Module()  # the FFN provider is attached by the mode
        else:
            model.layers[i] = PassThrough(model.layers[i])
    try:
        weights = mx.load(str(folder / RESIDENT_FILE))
    except Exception as e:
        raise FlashError(f"{folder / RESIDENT_FILE} is corrupt: {e}")
    down_bias = [None] * cfg.n_layers
    for k in [k for k in weights if k.endswith("mlp.down_proj.bias")]:
        down_bias[int(k.split("layers.")[1].split(".")[0]) - start] = weights.pop(k)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantize_like(model, weights, cfg.model_config.get("quantization"))
    params = dict(tree_flatten(model.parameters()))
    tied = is_tied(params)
    need = {k for k in params if owns(k, rank, ranks, (start, end), tied)}
    wrong = sorted(need ^ set(weights)) + sorted(k for k in need & set(weights) if params[k].shape != weights[k].shape)
    if wrong:
        raise FlashError(f"{folder / RESIDENT_FILE} does not hold rank {rank}'s weights: {wrong[0]}"
                         f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(list(weights.values()), [b for b in down_bias if b is not None])
    release_pages(folder / RESIDENT_FILE)
    model.eval()

    stage = Stage([model.layers[i] for i in range(start, end)], model.ffn_spec)
    if mode == "dense":
        attach_dense(stage, folder, cfg, down_bias)
    elif mode == "flash":
        _, transient, item = resident_facts(model, [])  # the activations' dtype, the head's per-token cost
        resident = sum(v.nbytes for v in weights.values()) + sum(b.nbytes for b in down_bias if b is not None)
        attach_flash(stage, folder, _plan_config(cfg), down_bias,
                     facts=(resident, transient if rank == ranks - 1 else 0, item), **flash_options)
        for k in ("kv_step", "flash_stats", "flash_plan", "flash_prefetch", "flash_reader"):
            setattr(model, k, getattr(stage, k))
    else:
        raise FlashError(f"unknown mode '{mode}'")
    model.flash_config = cfg
    model.pipeline_resident = sum(v.nbytes for v in weights.values())
    return model, cfg, stage


def connect(model, cfg: FlashConfig, link: Link):
    """Wrap the rank's first and last layers: activations in from the previous rank, out to the next."""
    start, end = cfg.pipeline["layers"]
    first, last = start, end - 1
    if first == last:
        model.layers[first] = Boundary(model.layers[first], link, link.rank > 0, not link.last)
        return
    if link.rank > 0:
        model.layers[first] = Boundary(model.layers[first], link, True, False)
    if not link.last:
        model.layers[last] = Boundary(model.layers[last], link, False, True)


# MARK: - generating


def step(model, cache, mine: List, ids: List[int], link: Optional[Link], logits: bool):
    """One forward pass of `ids`; the last rank (or a single process) returns the last position's logits
    when `logits`, evaluated; the others evaluate their layers' caches and send their output on."""
    out = model(mx.array(ids)[None], cache=cache)
    states = [c.state[:2] for c in mine]
    if link is None or link.last:
        out = out[:, -1, :] if logits else None
        mx.eval(out, states) if logits else mx.eval(states)
        return out
    mx.eval(states)  # this rank's layers (its first layer's input was waited for in Link.recv)
    link.flush()
    return None


def prefill_chunk(model) -> int:
    """Prompt tokens per forward pass, as generate.stream chooses them."""
    plan = getattr(model, "flash_plan", None)
    return plan.prefill_step if plan is not None else UNBUDGETED_PREFILL_STEP


def generate_tokens(model, prompt: List[int], max_tokens: int, sampler, prefill_step: int,
                    link: Optional[Link] = None, layers: Optional[Tuple[int, int]] = None,
                    eos=(), steered: bool = False) -> Iterator[Tuple[int, Optional[mx.array]]]:
    """Yields (token, its logits on the last rank, else None) as mlx-lm's generate_step does after
    generate.stream's prompt: all but the prompt's last token in chunks (numpy's matmuls on a CPU, as
    flash.prefill), then one token at a time. Every rank runs this same loop, in step.
    steered: rank 0 may stop early (a server's client left or hit a stop string): before each token
    it tells the others whether to go on (Leader.stream)."""
    cache = model.make_cache()
    mine = cache[slice(*layers)] if layers else cache  # a PassThrough's cache holds nothing to evaluate
    head, y = list(prompt[:-1]), list(prompt[-1:])
    with numpy_linears(model) if use_numpy(len(head)) else nullcontext():
        for i in range(0, len(head), prefill_step):
            step(model, cache, mine, head[i : i + prefill_step], link, False)
    for _ in range(max_tokens):
        if steered and not link.control(1):  # rank 0 says 0 once its consumer has stopped (Leader.stream)
            return
        logits = step(model, cache, mine, y, link, True)
        token = None
        if logits is not None:
            token = sampler(logits - mx.logsumexp(logits, keepdims=True))
        token = link.token(token) if link is not None else token.item()
        yield token, logits
        if token in eos:
            return
        y = [token]


@dataclass
class RankFigures:
    """One rank's figures for a request, per decode token where it says ms."""

    layers: Tuple[int, int]
    busy_ms: float  # its own work: the token's time minus its waits
    compute_ms: float
    io_ms: float  # reads the token waited for
    memory_ms: float  # the windows' bookkeeping and row moves
    recv_ms: float  # waiting for the previous rank's activations (that rank's work included)
    send_ms: float
    token_ms: float  # waiting for the sampled token (the later ranks' work included)
    bytes_sent: float
    bytes_read: float
    resident_mb: float
    kv_mb: float
    windows_mb: float
    total_mb: float
    budget_mb: float


def plan_row(model) -> List[float]:
    """What the rank holds, in MB: resident weights, KV cache, neuron windows (dense: its FFNs), total, budget."""
    pl = getattr(model, "flash_plan", None)
    if pl is None:
        ffn = sum(v.nbytes for l in model.layers if not isinstance(l, PassThrough)
                  for _, v in tree_flatten(getattr(l, "layer", l).mlp.parameters()))
        return [model.pipeline_resident / 1e6, 0.0, ffn / 1e6, (model.pipeline_resident + ffn) / 1e6, 0.0]
    return [pl.resident / 1e6, pl.kv_cache / 1e6, (pl.buffers + pl.pinned_bytes) / 1e6, pl.total / 1e6,
            (pl.budget or 0) / 1e6]


def plan_lines(layers: np.ndarray, rows: np.ndarray, mode: str) -> List[str]:
    what = "neuron windows" if mode == "flash" else "FFN"
    return [f"rank {r}: layers {int(a)}-{int(b) - 1} | resident {res:.1f} MB, KV cache {kv:.1f} MB, {what} "
            f"{win:.1f} MB, total {tot:.1f} MB" + (f" of a {bud:.1f} MB budget" if bud else "")
            for r, ((a, b), (res, kv, win, tot, bud)) in enumerate(zip(layers, rows))]


# MARK: - generate --pipeline


def agree(link: Link, failure: Optional[str]):
    """Every rank learns whether one failed; the first that did says why (one line), the rest exit quietly
    once it has (a rank that exits first gets the others stopped by mlx.launch, perhaps before they speak)."""
    failed = link.gather([1.0 if failure else 0.0])[:, 0]
    if not failed.any():
        return
    if failure and not failed[: link.rank].any():
        print(f"error: rank {link.rank}: {failure}", file=sys.stderr, flush=True)
    link.gather([0.0])  # said
    sys.exit(2)


def attempt(fn):
    """fn() and None, or None and the FlashError's sentence."""
    try:
        return fn(), None
    except FlashError as e:
        return None, str(e)


def figures_row(model, link: Link, layers, seconds: float, tokens: int, waits: Tuple[float, float, float],
                sent: int) -> List[float]:
    """This rank's row of figures (RankFigures' fields, flat) over `tokens` decode tokens of `seconds`
    (flash statistics reset at their start); waits: the link's (recv, send, token) seconds over them."""
    t = max(tokens, 1)
    ms = lambda s: 1000.0 * s / t
    recv, send, token = waits
    busy = seconds - recv - token
    s = model.flash_stats.snapshot() if getattr(model, "flash_stats", None) else {}
    io, memory = s.get("ms_io_exposed", 0.0), s.get("ms_memory", 0.0)
    return [*layers, ms(busy), ms(busy) - io - memory - ms(send), io, memory, ms(recv), ms(send), ms(token),
            sent / t, s.get("bytes_read_per_token", 0.0)] + plan_row(model)


def figure_lines(rows: np.ndarray, token_ms: float) -> List[str]:
    lines = []
    for r, row in enumerate(rows):
        f = RankFigures((int(row[0]), int(row[1])), *row[2:])
        lines.append(
            f"rank {r} (layers {f.layers[0]}-{f.layers[1] - 1}): busy {f.busy_ms:.1f} ms/token = compute "
            f"{f.compute_ms:.1f} + I/O {f.io_ms:.1f} + memory {f.memory_ms:.1f} + send {f.send_ms:.2f} | waits: "
            f"activations {f.recv_ms:.1f}, token {f.token_ms:.1f} ms | {f.bytes_sent:.0f} bytes sent/token, "
            f"{f.bytes_read / 1e6:.3f} MB read/token")
    passing = token_ms - rows[:, 2].sum()
    lines.append(f"pipeline: {token_ms:.1f} ms/token, of which passing activations and the token "
                 f"{passing:.2f} ms ({passing / token_ms:.1%}): the token's time minus every rank's busy time")
    return lines


def join(args, options: dict):
    """Start this rank (args: --model, --mode, --pipeline-timeout), load its part of the model, agree with
    the others that every rank holds its part of one split; rank 0 prints what each rank holds.
    Returns (link, model, cfg, tokenizer)."""
    link = start(args.pipeline_timeout)
    rank, size = link.rank, link.size
    folder, failure = attempt(lambda: rank_model_folder(args.model, rank, size))
    loaded, failure = attempt(lambda: load_rank(folder, rank, size, args.mode, **options)) if folder else (None, failure)
    agree(link, failure)
    model, cfg, _ = loaded
    connect(model, cfg, link)
    ids = link.gather([int(cfg.pipeline["split_id"][:6], 16)])[:, 0]  # 24 bits: exact in float32
    agree(link, None if ids[rank] == ids[0] else
          f"{folder} is from another split or model than rank 0's folder: split the model again for all ranks")
    rows = link.gather([*cfg.pipeline["layers"]] + plan_row(model))
    if rank == 0:
        for line in plan_lines(rows[:, :2], rows[:, 2:], args.mode):
            print(line, file=sys.stderr)
    return link, model, cfg, load_tokenizer(folder)


def generate_main(args, options: dict, prompt_of):
    """generate --pipeline on this rank: load its part, agree with the others, generate; rank 0 prints
    the text, the plan per rank before it and the figures per rank after it (stderr).
    prompt_of(tokenizer, model): the prompt's token ids (every rank computes the same)."""
    from mlx_lm.sample_utils import make_sampler

    link, model, cfg, tokenizer = join(args, options)
    rank, size = link.rank, link.size
    prompt, failure = attempt(lambda: prompt_of(tokenizer, model))
    agree(link, failure)

    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p)
    chunk = prefill_chunk(model)
    if getattr(model, "flash_stats", None) is not None:
        model.flash_stats.reset()
    detok = tokenizer.detokenizer
    eos = set(tokenizer.eos_token_ids)
    t0 = time.perf_counter()
    first, n, mark = None, 0, None
    for token, _ in generate_tokens(model, prompt, args.max_tokens, sampler, chunk, link,
                                    tuple(cfg.pipeline["layers"]), eos):
        n += 1
        if first is None:  # the prompt is done: the figures are the decode steps' from here
            first = time.perf_counter() - t0
            mark = (time.perf_counter(), link.recv_s, link.send_s, link.token_s, link.bytes_sent)
            if getattr(model, "flash_stats", None) is not None:
                model.flash_stats.reset()
        if token in eos:
            break
        if rank == 0:
            detok.add_token(token)
            print(detok.last_segment, end="", flush=True)
    end = time.perf_counter()
    tokens = n - 1
    waits = (link.recv_s - mark[1], link.send_s - mark[2], link.token_s - mark[3])
    row = figures_row(model, link, cfg.pipeline["layers"], end - mark[0], tokens, waits, link.bytes_sent - mark[4])
    rows = link.gather(row)
    if rank == 0:
        detok.finalize()
        print(detok.last_segment)
        token_ms = 1000.0 * (end - mark[0]) / max(tokens, 1)
        print(f"prompt: {len(prompt)} tokens, first token after {first:.2f} s | generation: {n} tokens, "
              f"{1000.0 / token_ms if token_ms else 0:.2f} tokens/s, {token_ms:.1f} ms/token | {size} ranks",
              file=sys.stderr)
        for line in figure_lines(rows, token_ms):
            print(line, file=sys.stderr)


# MARK: - the server: rank 0 serves, the other ranks follow its requests


def tell(link: Link, ids: List[int], max_tokens: int, temp: float, top_p: float, seed: Optional[int]):
    """Rank 0 sends a request to the other ranks (no ids: the server is stopping)."""
    head = mx.array([len(ids), max_tokens, -1 if seed is None else seed], mx.int32)
    mx.eval(mx.distributed.all_sum(head, group=link.group), mx.distributed.all_sum(
        mx.array([temp, top_p], mx.float32), group=link.group))
    if ids:
        with link.waiting("sending a request", None):
            mx.eval(mx.distributed.all_sum(mx.array(ids, mx.int32), group=link.group))


def follow(model, cfg: FlashConfig, link: Link, tokenizer):
    """A rank other than 0 of a pipelined server: run each request rank 0 tells, until it stops."""
    from mlx_lm.sample_utils import make_sampler

    eos, layers = set(tokenizer.eos_token_ids), tuple(cfg.pipeline["layers"])
    while True:
        head = mx.distributed.all_sum(mx.zeros((3,), mx.int32), group=link.group)  # idle: not watched
        floats = mx.distributed.all_sum(mx.zeros((2,), mx.float32), group=link.group)
        try:
            mx.eval(head, floats)
        except RuntimeError:
            raise FlashError(f"rank {link.rank}: lost the connection to rank 0 (it stopped or cannot be reached)")
        n, max_tokens, seed = head.tolist()
        if n == 0:
            return
        temp, top_p = floats.tolist()
        with link.waiting("waiting for rank 0's request", 0):
            ids = mx.distributed.all_sum(mx.zeros((n,), mx.int32), group=link.group).tolist()
        if seed >= 0:
            mx.random.seed(seed)
        sampler = make_sampler(temp=temp, top_p=top_p) if link.last else None
        for _ in generate_tokens(model, ids, max_tokens, sampler, prefill_chunk(model), link, layers, eos,
                                 steered=True):
            pass
