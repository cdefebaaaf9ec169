"""Engine-agnostic hand-off logic shared by the engine adapters: lease/pull books
(`lifecycle`) and the pure layout mapping between differently shaped paged caches
(`layout_transform`). Nothing here imports an engine."""
