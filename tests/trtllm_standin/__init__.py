"""A stand-in for the part of TensorRT-LLM that a KV cache connector touches.

TensorRT-LLM cannot be installed on the machines this project is developed and tested on, so
the connector is exercised against this stand-in, our own code written from TensorRT-LLM's
source (the 1.2-era ``_torch/pyexecutor/kv_cache_connector.py`` and main's
``_torch/pyexecutor/connectors/``, ``py_executor.py``, ``py_executor_creator.py``,
``resource_manager.py``, the C++ ``kvCacheManager.cpp`` and the nanobind request bindings):

* `kv_cache_connector`: the connector base classes, ``RequestData``, ``SchedulerOutput``;
* `llm_request`: the Python request and the C++-shaped request ``get_num_new_matched_tokens``
  really receives (only bound attributes; ``cache_salt_id``, never a ``cache_salt`` string);
* `kv_manager`: blocks, and the connector asked only with block reuse on;
* `manager`: the connector manager's bookkeeping (rank-0 scheduler, broadcast, all-gather);
* `executor`: one rank's overlap executor loop; `instance`: the creator (concurrent
  construction, start-up rejections), rank threads, crash and hang detection;
* `mpi`: ranks as threads with blocking collectives; `fake_model`: deterministic KV and tokens.

docs/trtllm-notes.md has the table of each behaviour, the TensorRT-LLM function it follows, and
what is not modelled.
"""
