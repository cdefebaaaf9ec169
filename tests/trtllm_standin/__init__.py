"""A stand-in for the part of TensorRT-LLM 1.2 that a KV cache connector touches.

TensorRT-LLM cannot be installed on the machines this project is developed and tested on, so
the connector is exercised against this stand-in. It reproduces, in our own code, what
TensorRT-LLM 1.2 documents and does (read from its source,
``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py`` and ``py_executor.py``):

* the connector base classes and their method signatures (`kv_cache_connector`);
* the request data handed to ``build_connector_meta`` (`RequestData`, `SchedulerOutput`);
* the connector manager's bookkeeping (`manager`): scheduler on rank 0 only with its results
  broadcast (pickled) to every rank; async loads/saves tracked per rank; a request counts as
  finished only once *every* rank has reported it from ``get_finished``;
* the executor loop's per-iteration order (`executor`): schedule (``get_num_new_matched_tokens``,
  block allocation, ``update_state_after_alloc``) -> ``build_connector_meta`` + bind ->
  ``start_load_kv`` -> forward with per-layer ``wait_for_layer_load`` / ``save_kv_layer`` hooks
  -> ``wait_for_save`` -> sampling, ``request_finished`` for finished requests ->
  ``get_finished``; the KV pool tensor ``[num_blocks, num_layers, kv_factor, per_block]`` given
  once to ``register_kv_caches``.

It is not TensorRT-LLM: there is no model, no CUDA graph, no MPI (ranks are objects in one
process), and the KV values come from a deterministic fake model (`fake_model`).
"""
