"""Pipeline-parallel inference on Ray: one model's layers across the machines of a cluster.

The layers are cut into N contiguous stages balanced by bytes (split_layers). Each stage is a
Ray actor (Stage) on a node of the cluster: it opens the checkpoint itself, at the same path
as the driver, maps only its own tensors (its layers; the embeddings in the first stage, the
final norm and the output head in the last) and holds its own KV cache: a Transformer made
with `layers=`, run by its forward_stage. The driver's Pipeline gives the tokens to the first
stage, and each stage's hidden states (B, T, dim) go to the next as a Ray object reference,
stage to stage without a round trip through the driver; only the logits come back, and
sampling stays on the driver. Pipeline.forward is Transformer.forward itself, so Generator,
chat, trace and golden run over a Pipeline unchanged, with the one-process results bit for
bit: the same numpy operations on the same data.

Ray is an optional extra (pip install npllama[ray]), imported only by this module.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from ..io.checkpoint import open_tensors, read_checked, stored_bytes
from ..model.config import ModelArgs
from ..errors import CheckpointError, MissingDependencyError, NpllamaError, StageError, UsageError
from ..model.memory import PREFILL_CHUNK
from ..model.model import DTYPES, Transformer
from ..model.observer import IGNORE, Recorder
from ..version import __version__
from ..model.weights import WEIGHT_MODES, choose_mode, held_names


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("running on Ray needs the ray package: pip install 'npllama[ray]'") from None
    return ray


def split_layers(args: ModelArgs, nbytes: dict[str, int], n_stages: int) -> list[range]:
    """n_stages contiguous ranges of layers covering them all, at least one layer each, that
    make the largest stage's bytes as small as they can be. nbytes: tensor name -> bytes (a
    stage holds held_names' tensors: the embeddings count in the first, the head in the last)."""
    L = args.n_layers
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or not 1 <= n_stages <= L:
        raise UsageError(f"the number of stages must be between 1 and the model's {L} layers, got {n_stages!r}")
    tied = "output.weight" not in nbytes
    prefix = [0]                                 # prefix[j]: bytes of layers [0, j), each with what it brings
    for i in range(L):
        prefix.append(prefix[-1] + sum(nbytes[n] for n in held_names(args, range(i, i + 1), tied)))
    # largest[s][j]: the smallest possible largest stage when layers [0, j) form s stages;
    # start[s][j]: where the last of those stages then starts.
    largest = [[float("inf")] * (L + 1) for _ in range(n_stages + 1)]
    start = [[0] * (L + 1) for _ in range(n_stages + 1)]
    largest[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, L - (n_stages - s) + 1):
            for i in range(s - 1, j):
                cost = max(largest[s - 1][i], prefix[j] - prefix[i])
                if cost < largest[s][j]:
                    largest[s][j], start[s][j] = cost, i
    ranges, j = [], L
    for s in range(n_stages, 0, -1):
        ranges.append(range(start[s][j], j))
        j = start[s][j]
    return ranges[::-1]


def tensor_bytes(index: dict) -> dict[str, int]:
    """A converted checkpoint's tensors' sizes, from its index."""
    return {name: stored_bytes(t) for name, t in index["tensors"].items()}


class Stage:
    """One pipeline stage: a Transformer holding `layers`, made from the checkpoint at `path`
    as the node it runs on sees it. Pipeline runs it as a Ray actor; it runs without Ray too.
    `where` ("stage 1 (layers 15..29) on node ...") starts every error it reports."""

    def __init__(self, path: str, layers: range, where: str):
        self.path, self.layers, self.where = path, layers, where
        self.model: Transformer | None = None

    def load(self, params: dict, index: dict, dtype: str, max_seq_len: int, max_batch_size: int,
             weights_mode: str, share: int = 1, prefill_chunk: int = PREFILL_CHUNK) -> dict:
        """Check the checkpoint here is the one the driver read (params and index, shard
        digests included), map this stage's tensors and make its model. share: how many
        stages share this node's memory (for weights_mode "auto"). prefill_chunk: Transformer's."""
        try:
            args, here = read_checked(self.path)
            if args.to_dict() != params or here != index:
                raise CheckpointError(f"{self.path}: not the checkpoint the driver read (params.json or index.json "
                                      "differ): every node needs the same files at the same path")
            names = held_names(args, self.layers, "output.weight" not in here["tensors"])
            tensors = open_tensors(self.path, here, names)
            mode = choose_mode(tensors, weights_mode, share)
            self.model = Transformer(args, tensors, dtype, max_seq_len, max_batch_size, mode, prefill_chunk,
                                     self.layers)
        except NpllamaError as e:
            raise type(e)(f"{self.where}: {e}") from None
        return {"pid": os.getpid(), "npllama": __version__, "weights_mode": self.model.weights_mode,
                "max_seq_len": self.model.max_seq_len,
                "bytes": sum(int(t.nbytes) for t in tensors.values())}

    def forward(self, x: np.ndarray, start_pos: int, trace: dict | None, last_only: bool) -> tuple[np.ndarray, dict]:
        """forward_stage on x (tokens for the first stage, else hidden states) -> its output
        and, when trace is {"layers", "squeeze"}, the intermediates it recorded."""
        out: dict = {}
        record = IGNORE if trace is None else Recorder(out, trace["layers"], trace["squeeze"])
        return self.model.forward_stage(x, start_pos, record, last_only), out

    def forward_rows(self, x: np.ndarray, positions: np.ndarray, rows: np.ndarray, last_only: bool) -> np.ndarray:
        """forward_stage on a microbatch: row b of x is its own sequence in cache row rows[b]
        at position positions[b] (continuous batching over the pipeline, npllama serve --ray)."""
        return self.model.forward_stage(x, positions, last_only=last_only, rows=rows)

    def copy_rows(self, src: int, dst: int, n: int) -> None:
        self.model.copy_rows(src, dst, n)


@dataclass
class Node:
    id: str
    name: str          # "hostname (ip)"
    cpus: int


def cluster_nodes(ray) -> list[Node]:
    """The live nodes with CPUs, the driver's own first, then by address."""
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if not nodes:
        raise StageError("the Ray cluster has no live node with CPUs to run stages on")
    nodes.sort(key=lambda n: (n["NodeID"] != here, n["NodeManagerAddress"]))
    return [Node(n["NodeID"], f"{n.get('NodeManagerHostname', '?')} ({n['NodeManagerAddress']})",
                 max(1, int(n["Resources"]["CPU"]))) for n in nodes]


class Pipeline:
    """A model whose layers run as stages on a Ray cluster (connect() first): stage i of N on
    node i of the cluster (the driver's node first), or, with more stages than nodes, runs
    of consecutive stages per node. It has Transformer's interface for generation, chat,
    traces and golden bundles (forward, args, dtype, max_seq_len, max_batch_size).

    stages: how many (default: one per node). timeout: seconds a forward pass may take
    (None: no limit; a stage that dies is reported at once whatever the limit).
    start_timeout: seconds the stages may take to start and open the checkpoint.
    max_seq_len, max_batch_size, prefill_chunk, weights_mode: each stage's Transformer's (with
    max_seq_len None each stage takes what fits its node, and the pipeline the least). A stage
    that fails leaves the pipeline unusable: its KV cache is gone (start a new Pipeline).
    """

    # Transformer's own forward and checks: a Pipeline differs only in forward_stage.
    forward = __call__ = Transformer.forward
    check_tokens = Transformer.check_tokens
    check_positions = Transformer.check_positions
    check_rows = Transformer.check_rows

    def __init__(self, path: str, stages: int | None = None, dtype: str = "float32", max_seq_len: int | None = None,
                 max_batch_size: int = 1, weights_mode: str = "auto", timeout: float | None = None,
                 start_timeout: float = 300.0, prefill_chunk: int = PREFILL_CHUNK):
        ray = import_ray()
        if not ray.is_initialized():
            raise UsageError("Ray is not running in this process: call npllama.distributed.connect() first")
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if weights_mode not in WEIGHT_MODES:
            raise UsageError(f"weights mode must be one of {WEIGHT_MODES}, got {weights_mode!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size <= 0:
            raise UsageError(f"the batch size must be a positive integer, got {max_batch_size!r}")
        args, index = read_checked(path)
        self.args, self.dtype, self.path, self.timeout = args, dtype, path, timeout
        self.max_batch_size = max_batch_size
        self.held = range(args.n_layers)
        self.broken: str | None = None
        nodes = cluster_nodes(ray)
        self.ranges = split_layers(args, tensor_bytes(index), min(len(nodes), args.n_layers) if stages is None
                                   else stages)
        n = len(self.ranges)
        on = [nodes[i * min(len(nodes), n) // n] for i in range(n)]
        self.where = [f"stage {i} (layers {r.start}..{r.stop - 1}) on node {node.name}"
                      for i, (r, node) in enumerate(zip(self.ranges, on))]
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        actor = ray.remote(Stage)
        # Placed on their node and nowhere else; num_cpus=0 reserves nothing, so stages on one
        # node run one after another as in one process. Ray gives an actor one BLAS thread
        # unless told otherwise: a stage gets its node's CPUs, as a process of its own would.
        self.stages = [actor.options(num_cpus=0, max_restarts=0,
                                     scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
                                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(node.cpus)}})
                       .remote(path, r, where) for r, node, where in zip(self.ranges, on, self.where)]
        try:
            self.info = self._results([s.load.remote(args.to_dict(), index, dtype, max_seq_len, max_batch_size,
                                                     weights_mode, on.count(node), prefill_chunk)
                                       for s, node in zip(self.stages, on)], start_timeout, "while starting")
            for where, info in zip(self.where, self.info):
                if info["npllama"] != __version__:
                    raise StageError(f"{where}: runs npllama {info['npllama']}, the driver {__version__}: install "
                                     "the same version on every node")
        except BaseException:
            self.close()
            raise
        self.weights_mode = ",".join(sorted({info["weights_mode"] for info in self.info}))
        # max_seq_len None: each stage takes the longest context that fits its node (npllama.memory);
        # the pipeline runs at the shortest of them.
        self.max_seq_len = min(info["max_seq_len"] for info in self.info)

    def forward_stage(self, x: np.ndarray, start_pos: int, record=IGNORE, last_only: bool = False) -> np.ndarray:
        """Tokens (B, T) through every stage -> logits (B, T or 1, vocab). Each stage's
        output goes to the next as an object reference; a Recorder gets every stage's
        intermediates."""
        if self.broken:
            raise StageError(self.broken)
        trace = {"layers": record.layers, "squeeze": record.squeeze} if isinstance(record, Recorder) else None
        outputs, traces = [], []
        for stage in self.stages:
            x, recorded = stage.forward.options(num_returns=2).remote(x, start_pos, trace, last_only)
            outputs.append(x)
            traces.append(recorded)
        logits, *recorded = self._results([outputs[-1]] + (traces if trace else []), self.timeout, "during a forward pass",
                                          outputs)
        for part in recorded:
            # copies: arrays fetched from Ray's object store are read-only views of it
            record.out.update({record.prefix + name: np.array(v) for name, v in part.items()})
        return np.array(logits)

    def submit_rows(self, tokens, start_pos, rows, last_only: bool = True) -> list:
        """Starts a microbatch through the stages without waiting for it: tokens (B, T), row
        b its own sequence in cache row rows[b] at positions start_pos[b].. (forward_rows'
        arguments) -> a handle for collect. Each stage runs its tasks in the order they were
        submitted, so microbatches submitted one after another keep every stage busy: stage 1
        runs microbatch 0 while stage 0 runs microbatch 1."""
        if self.broken:
            raise StageError(self.broken)
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise UsageError(f"forward_rows takes tokens (B, T), got shape {tokens.shape}")
        self.check_tokens(tokens, 0)
        rows, start_pos = self.check_rows(*tokens.shape, start_pos, rows)
        x, refs = tokens, []
        for stage in self.stages:
            x = stage.forward_rows.remote(x, start_pos, rows, last_only)
            refs.append(x)
        return refs, last_only

    def collect(self, handle: tuple) -> np.ndarray:
        """A submitted microbatch's logits: (B, vocab) with last_only, else (B, T, vocab)."""
        if self.broken:
            raise StageError(self.broken)
        refs, last_only = handle
        logits = np.array(self._results(refs[-1:], self.timeout, "during a forward pass", refs)[0])
        return logits[:, 0] if last_only else logits

    def forward_rows(self, tokens, start_pos, rows, last_only: bool = True) -> np.ndarray:
        """Transformer.forward_rows over the stages."""
        return self.collect(self.submit_rows(tokens, start_pos, rows, last_only))

    def copy_rows(self, src: int, dst: int, n: int) -> None:
        """Transformer.copy_rows in every stage; queued behind the tasks already submitted."""
        self.check_rows(1, n, [0], [dst])
        self.check_rows(1, n, [0], [src])
        for stage in self.stages:
            stage.copy_rows.remote(src, dst, n)

    def _results(self, refs: list, timeout: float | None, doing: str, per_stage: list | None = None) -> list:
        """ray.get(refs); per_stage: each stage's own result, in order (default refs). A stage
        that raised an NpllamaError, died or did not answer in time is named in the error."""
        ray = import_ray()
        per_stage = refs if per_stage is None else per_stage
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(per_stage, num_returns=len(per_stage), timeout=0)
            i = next((i for i, r in enumerate(per_stage) if r not in ready), len(per_stage) - 1)
            self.broken = f"{self.where[i]} did not answer within {timeout} s ({doing})"
        except ray.exceptions.RayError as e:
            i, err = self._first_failure(per_stage, e)
            if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, NpllamaError):
                raise err.cause from None               # the stage's own error, which names it
            if isinstance(err, ray.exceptions.RayTaskError) and not isinstance(err, ray.exceptions.RayActorError):
                raise err                               # a bug: keep the stage's traceback
            first_line = (str(err).strip().splitlines() or [""])[0]
            self.broken = (f"{self.where[i]} died {doing} ({type(err).__name__}: {first_line}); its weights and "
                           "KV cache are gone: start the pipeline again (if its node ran out of memory: more stages, "
                           "or --weights tiled)")
        raise StageError(self.broken)

    @staticmethod
    def _first_failure(per_stage: list, default: Exception) -> tuple[int, Exception]:
        # A failed stage fails every stage after it (their input never came): the first
        # failed result, in stage order, is the one that failed first.
        ray = import_ray()
        for i, ref in enumerate(per_stage):
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayError as e:
                return i, e
        return len(per_stage) - 1, default

    def describe(self) -> list[str]:
        """A line per stage: its layers, node, bytes mapped and how it holds them."""
        return [f"{where}: {info['bytes'] / 1e9:.2f} GB of weights ({info['weights_mode']}), pid {info['pid']}"
                for where, info in zip(self.where, self.info)]

    def close(self) -> None:
        """Stop the stages (their memory maps and KV caches go with them)."""
        ray = import_ray()
        for stage in self.stages:
            ray.kill(stage)
        self.stages, self.broken = [], "the pipeline was closed"

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(address: str = "local", **init_kwargs) -> None:
    """Ray in this process: "local" starts a Ray runtime on this machine (it stops when the
    process ends); anything else is the address of a running cluster to join ("auto", or
    HOST:PORT of `ray start --head`). init_kwargs go to ray.init. Nothing if Ray already runs."""
    ray = import_ray()
    if ray.is_initialized():
        return
    # Ray's usage statistics go to its authors over the network; npllama asks for none.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(address="local", include_dashboard=False) if address == "local" else dict(address=address)
    try:
        ray.init(**kwargs, logging_level=logging.WARNING, **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StageError(f"--ray {address}: could not {'start' if address == 'local' else 'join'} Ray: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def load(path: str, stages: int | None = None, address: str = "local", **kwargs) -> Pipeline:
    """A converted checkpoint as a Pipeline on Ray (connect(address) first if needed);
    kwargs are Pipeline's (dtype, max_seq_len, max_batch_size, weights_mode, timeout)."""
    connect(address)
    return Pipeline(path, stages, **kwargs)
