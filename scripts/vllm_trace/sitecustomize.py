"""Diagnostic tracer for vLLM servers (docs/vllm-notes.md, "Where the decode leg's overhead went").

Loaded by Python at start-up when this folder is on PYTHONPATH and DTRACE_DIR is set (every process
of a vLLM server inherits both): it wraps the API server's `create_completion` / `process_outputs`,
the engine core's `add_request` / `step`, the scheduler's `schedule` / `update_from_output`, the
worker's `execute_model` / `sample_tokens`, every `UcxConnector` method, the connector worker's
planning helpers, `Agent.read` and `Transfer.wait`, and appends "<CLOCK_MONOTONIC ns> <pid> <name>>"
on entry and "... <name><" on exit to DTRACE_DIR/ev-<pid>.log. Without DTRACE_DIR it does nothing.
Driven by `probe.py` next to it. Not for production: it patches classes after import."""
import functools
import importlib.abc
import importlib.util
import inspect
import os
import sys
import time

_DIR = os.environ.get("DTRACE_DIR")
_fd = None

def ev(name):
    global _fd
    if _fd is None:
        _fd = os.open(f"{_DIR}/ev-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{time.monotonic_ns()} {os.getpid()} {name}\n".encode())

def _timed(f, tag):
    """`f` stamped on entry (tag>) and exit (tag<)."""
    @functools.wraps(f)
    def w(*a, **k):
        ev(tag + ">")
        try:
            return f(*a, **k)
        finally:
            ev(tag + "<")
    return w


def wrap(cls, meth, tag):
    f = getattr(cls, meth, None)
    if f is None:
        return
    if inspect.iscoroutinefunction(f):
        @functools.wraps(f)
        async def w(*a, **k):
            ev(tag + ">")
            try:
                return await f(*a, **k)
            finally:
                ev(tag + "<")
    else:
        w = _timed(f, tag)
    setattr(cls, meth, w)

def p_serving(m):
    wrap(m.OpenAIServingCompletion, "create_completion", "api_create")
def p_outproc(m):
    wrap(m.OutputProcessor, "process_outputs", "api_procout")
def p_core(m):
    wrap(m.EngineCore, "add_request", "ec_add")
    wrap(m.EngineCore, "step", "ec_step")
def p_sched(m):
    wrap(m.Scheduler, "schedule", "sch_schedule")
    wrap(m.Scheduler, "update_from_output", "sch_update")
def p_worker(m):
    wrap(m.Worker, "execute_model", "w_exec")
    wrap(m.Worker, "sample_tokens", "w_sample")
def p_conn(m):
    C = m.UcxConnector
    for meth, tag in [("get_num_new_matched_tokens", "c_match"), ("update_state_after_alloc", "c_alloc"),
                      ("build_connector_meta", "c_meta"), ("start_load_kv", "c_load"), ("wait_for_save", "c_save"),
                      ("get_finished", "c_fin"), ("get_transfer_results", "c_fin2"),
                      ("update_connector_output", "c_upd"), ("build_connector_worker_meta", "c_wmeta"),
                      ("get_kv_connector_stats", "c_stats")]:
        wrap(C, meth, tag)

def wrapf(m, fname, tag):
    setattr(m, fname, _timed(getattr(m, fname), tag))
def p_wk(m):
    for meth in ("_parts", "_plan", "_pull_now", "_scratch_region", "_notify"):
        wrap(m.UcxWorker, meth, "wk" + meth)
    for fn in ("plan_reads", "local_descs", "readers_of", "read_done_payload"):
        wrapf(m, fn, "f_" + fn)
def p_agent(m):
    wrap(m.Agent, "read", "a_read")
def p_xfer(m):
    wrap(m.Transfer, "wait", "x_wait")
TARGETS = {"nixl_connectors.vllm.worker": p_wk, "transport.agent": p_agent, "transport.transfer": p_xfer,
           "vllm.entrypoints.openai.completion.serving": p_serving,
           "vllm.v1.engine.output_processor": p_outproc,
           "vllm.v1.engine.core": p_core,
           "vllm.v1.core.sched.scheduler": p_sched,
           "vllm.v1.worker.gpu_worker": p_worker,
           "nixl_connectors.vllm.connector": p_conn}

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None:
            return None
        orig = spec.loader.exec_module
        def exec_module(module, orig=orig, name=name):
            orig(module)
            try:
                TARGETS[name](module)
            except Exception as e:
                ev(f"patchfail:{name}:{e}")
        spec.loader.exec_module = exec_module
        return spec

if _DIR:
    sys.meta_path.insert(0, Finder())
