"""Generate text, streaming tokens to stdout and one stats line to stderr.

    python -m mlx_flash.generate --model smollm2-135m --prompt "The capital of France is"
    python -m mlx_flash.generate --model models/smollm2-135m --mode flash --dram-budget 0.6 --chat -p "Hi"
    python -m mlx_flash.generate --chat        (a conversation on stdin, the KV cache kept between turns)

Flags follow mlx-lm's where they overlap (--model, --prompt, --max-tokens,
--temp, --top-p, --seed). Generation is mlx-lm's own loop; only the FFN differs.
"""

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .conversation import Conversation
from .errors import FlashError, cli
from .flash.budget import DEFAULT_MAX_KV_SIZE, DEFAULT_PREFILL_STEP, UNBUDGETED_PREFILL_STEP
from .flash.prefill import prefill, use_numpy
from .flash.prompt import MODES as PROMPT_MODES
from .load import MODES, load
from .prepare import model_for
from .sources import DEFAULT_MODEL
from .system import peak_rss_bytes

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0


@dataclass
class Response:
    """One streamed step: mlx-lm's fields plus what flash mode read from disk so far."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, MLX allocator
    finish_reason: Optional[str]
    flash: dict = field(default_factory=dict)  # cumulative flash statistics for this request
    cached_tokens: int = 0  # of prompt_tokens, those a kept conversation's cache held (not computed)
    ttft: float = 0.0  # seconds from the request to its first token


def flash_snapshot(model) -> dict:
    stats = getattr(model, "flash_stats", None)
    return stats.snapshot() if stats is not None else {}


class StopFilter:
    """Cuts text at the first stop string, holding back a tail that may be the start of one."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str):
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out



def check_context(model, prompt_tokens: int, max_tokens: int):
    """Flash mode reserves KV cache for plan.max_kv_size tokens: refuse a request that would not fit."""
    plan = getattr(model, "flash_plan", None)
    if plan is not None and prompt_tokens + max_tokens > plan.max_kv_size:
        raise FlashError(f"the prompt ({prompt_tokens} tokens) plus up to {max_tokens} new tokens exceeds the "
                         f"{plan.max_kv_size}-token context reserved in the DRAM budget: shorten the prompt, lower "
                         f"--max-tokens or raise --max-kv-size")


def stream(model, tokenizer, prompt, max_tokens=DEFAULT_MAX_TOKENS, temp=DEFAULT_TEMP,
           top_p=DEFAULT_TOP_P, seed=None, stop=None, conversation: Optional[Conversation] = None
           ) -> Iterator[Response]:
    """mlx-lm's stream_generate with flash statistics attached and optional stop strings.

    prompt: text (used as is) or a list of token ids (e.g. from a chat template).
    The flash statistics are reset per call and count decode steps apart from the prompt.
    In flash mode the prompt is processed in the planned chunks, within the planned context.
    conversation: the kept KV cache of the previous request (conversation.py): only the prompt's
    tokens after the prefix it holds are computed.
    """
    t0 = time.perf_counter()
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    stats = getattr(model, "flash_stats", None)
    if stats is not None:
        stats.reset()
    options = {}
    plan = getattr(model, "flash_plan", None)
    if isinstance(prompt, str):  # as stream_generate would
        bos = getattr(tokenizer, "bos_token", None)
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    if plan is not None:
        check_context(model, len(prompt), max_tokens)  # the whole context, cached part included
        options["prefill_step_size"] = plan.prefill_step
    ids, held = prompt, 0
    if conversation is not None:
        options["prompt_cache"], held = conversation.reuse(ids)
        prompt = ids[held:]
    stops = StopFilter(stop or [])
    generated, ttft = [], None
    try:
        if use_numpy(len(prompt) - 1):
            # all but the last token with numpy's matmuls (flash.prefill); the last one in mlx-lm's loop
            cache = options.get("prompt_cache") or make_prompt_cache(model)
            chunk = plan.prefill_step if plan is not None else UNBUDGETED_PREFILL_STEP
            prefill(model, cache, list(prompt[:-1]), chunk)
            options["prompt_cache"], prompt = cache, prompt[-1:]
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler, **options):
            generated.append(r.token)
            ttft = ttft or time.perf_counter() - t0
            text, hit = stops.feed(r.text)
            finish = "stop" if hit else r.finish_reason
            if finish and not hit:
                text += stops.flush()
            computed = len(ids) - held  # the prompt's tokens this request ran through the model
            yield Response(text, r.token, len(ids), computed / ttft, r.generation_tokens,
                           r.generation_tps, r.peak_memory, finish, flash_snapshot(model), held, ttft)
            if hit:
                break
    except GeneratorExit:  # the caller stopped between tokens: the cache holds a consistent prefix
        pass
    except BaseException:
        if conversation is not None:
            conversation.drop()  # a layer may have stored keys that the others did not
        raise
    if conversation is not None:
        conversation.record(ids, generated)


def stats_line(r: Response) -> str:
    ms = 1000.0 / r.generation_tps if r.generation_tps else float("nan")
    rss_gb = peak_rss_bytes() / 1e9
    f = r.flash
    read = f"{f.get('bytes_read_per_token', 0) / 1e6:.3f} MB read/token" if f else "0 MB read/token (dense)"
    if f and f.get("expert_hit_rate") is not None:  # a mixture of experts (flash/experts.py)
        read += f", {f['experts_read_per_token']:.2f} experts read/token, expert hit rate {f['expert_hit_rate']:.2f}"
    if f and f.get("prefetch_hit_rate") is not None:
        read += f", prefetch hit rate {f['prefetch_hit_rate']:.2f}"
    if f and f.get("prompt_mode"):  # flash.prompt: one pass over every bundle, or window steps
        read += f" | prompt as {f['prompt_mode']}: {f['prompt_bytes_read'] / 1e6:.1f} MB read"
    return (
        f"prompt: {r.prompt_tokens} tokens{f' ({r.cached_tokens} cached)' if r.cached_tokens else ''}, "
        f"{r.prompt_tps:.1f} tokens/s, first token after {r.ttft:.2f} s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.2f} tokens/s, {ms:.1f} ms/token | "
        f"peak memory: {r.peak_memory:.3f} GB (MLX), {rss_gb:.3f} GB (RSS) | {read}"
    )


def add_model_arguments(p):
    """--model, --mode and the flash options: shared by generate and the server."""
    p.add_argument("--model", "-M", default=DEFAULT_MODEL,
                   help="built-in name, GGUF file, HF folder, flash folder or Hub id (default: %(default)s); "
                        "a built-in name in flash mode is converted and calibrated on first use")
    p.add_argument("--mode", choices=MODES, default="dense",
                   help="dense: all weights in memory; flash: FFN neurons streamed from disk")
    p.add_argument("--dram-budget", default=None,
                   help="flash mode: memory budget in bytes (e.g. 60M, 1.5G) or a fraction of the model (0.6)")
    p.add_argument("--window", type=int, default=None, help="flash mode: tokens in the neuron window")
    p.add_argument("--threads", type=int, default=None, help="flash mode: parallel reads")
    p.add_argument("--recall", type=float, default=None,
                   help="flash mode: predictor recall level to run at (one of those calibrated; default: the calibrated target, 0.98)")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help=f"flash mode: tokens of context (prompt + generated) the budget reserves KV cache for; "
                        f"longer requests are refused (default {DEFAULT_MAX_KV_SIZE})")
    p.add_argument("--prefill-step", type=int, default=None,
                   help=f"flash mode: prompt tokens per forward pass (default: the longest, up to the context, that "
                        f"leaves the neuron windows their calibrated size; at least {DEFAULT_PREFILL_STEP})")
    p.add_argument("--prompt-mode", choices=PROMPT_MODES, default=None,
                   help="flash mode: how a prompt's FFN is read: pass (every bundle once, in sequential slices: "
                        "exactly dense), window (window steps, as decoding) or auto (default: per prompt and layer, "
                        "whichever reads fewer bytes)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="flash mode: read each layer's predicted neurons while the layer before computes (needs "
                        "train_predictors --lookahead; default: on when the model has lookahead predictors and the "
                        "budget holds them)")
    p.add_argument("--profile", action="store_true",
                   help="flash mode: time attention, prediction and FFN compute apart (adds a host sync per phase)")


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Generate text with an mlx-flash model.")
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", default=None,
                   help=f"prompt text, or - to read stdin (default: '{DEFAULT_PROMPT}'; with --chat and no prompt, "
                        f"a conversation: each line of stdin is a turn, the KV cache kept between turns)")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system-prompt", default=None, help="system message when --chat is given")
    p.add_argument("--pipeline", action="store_true",
                   help="this is one rank of a model split over several machines (mlx_flash.split): start every rank "
                        "with python -m mlx_flash.launch --ranks N -- generate ... --pipeline (mlx_flash.pipeline)")
    p.add_argument("--pipeline-timeout", type=float, default=None,
                   help="--pipeline: seconds to wait for another rank before giving up on it (default: 300)")
    return p


def pipeline_prompt(args, tokenizer, model) -> List[int]:
    """The prompt's token ids on a pipeline rank (every rank computes them from the same arguments)."""
    text = sys.stdin.read() if args.prompt == "-" else args.prompt or DEFAULT_PROMPT
    prompt = build_prompt(tokenizer, text, args.chat, args.system_prompt)
    if isinstance(prompt, str):  # as stream() does
        bos = getattr(tokenizer, "bos_token", None)
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    check_context(model, len(prompt), args.max_tokens)
    return list(prompt)


def flash_options(args) -> dict:
    opts = {"dram_budget": args.dram_budget, "window": args.window, "threads": args.threads,
            "recall": args.recall, "max_kv_size": args.max_kv_size, "prefill_step": args.prefill_step,
            "prefetch": args.prefetch, "profile": args.profile or None, "prompt_mode": args.prompt_mode}
    return {k: v for k, v in opts.items() if v is not None}


def build_prompt(tokenizer, text: str, chat: bool, system: Optional[str] = None):
    if not chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise FlashError("--chat: this model has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def converse(model, tokenizer, args):
    """--chat without a prompt: each line of stdin is the user's turn; the whole conversation goes
    through the chat template each turn, and the kept KV cache (conversation.py) computes only
    what is new. Ends at end of input or an empty line."""
    if not getattr(tokenizer, "chat_template", None):
        raise FlashError("--chat: this model has no chat template")
    conversation = Conversation(model)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        messages.append({"role": "user", "content": line.strip()})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply, last = "", None
        for r in stream(model, tokenizer, ids, args.max_tokens, args.temp, args.top_p, args.seed,
                        conversation=conversation):
            print(r.text, end="", flush=True)
            reply, last = reply + r.text, r
        print()
        messages.append({"role": "assistant", "content": reply})
        if last is not None:
            print(stats_line(last), file=sys.stderr)


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise FlashError("--max-tokens must be at least 1")
    if not 0 < args.top_p <= 1 or args.temp < 0:
        raise FlashError("--top-p must be in (0, 1] and --temp at least 0")
    if args.mode != "flash" and flash_options(args):
        raise FlashError("--dram-budget, --window, --threads, --recall, --max-kv-size, --prefill-step, --prefetch, "
                         "--prompt-mode and --profile apply to --mode flash only")
    if args.pipeline:  # one rank of several (mlx_flash.pipeline)
        from .pipeline import DEFAULT_TIMEOUT, generate_main

        if args.chat and args.prompt is None:
            raise FlashError("--pipeline generates for one prompt: give --prompt (a conversation is not supported)")
        args.pipeline_timeout = args.pipeline_timeout or DEFAULT_TIMEOUT
        return generate_main(args, flash_options(args), lambda tok, model: pipeline_prompt(args, tok, model))
    if args.pipeline_timeout is not None:
        raise FlashError("--pipeline-timeout applies to --pipeline only")
    model, tokenizer = load(model_for(args.model, args.mode), mode=args.mode, **flash_options(args))
    if args.chat and args.prompt is None:
        return converse(model, tokenizer, args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt or DEFAULT_PROMPT
    prompt = build_prompt(tokenizer, text, args.chat, args.system_prompt)
    last = None
    for r in stream(model, tokenizer, prompt, args.max_tokens, args.temp, args.top_p, args.seed):
        print(r.text, end="", flush=True)
        last = r
    print()
    if last is not None:
        print(stats_line(last), file=sys.stderr)


if __name__ == "__main__":
    main()
