"""Stand-in of the parts of TensorRT-LLM's ``LlmRequest`` a connector reads."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional


class LlmRequestState(enum.Enum):
    CONTEXT_INIT = "context_init"
    GENERATION_IN_PROGRESS = "generation_in_progress"
    GENERATION_COMPLETE = "generation_complete"
    DISAGG_GENERATION_TRANS_IN_PROGRESS = "disagg_generation_trans_in_progress"  # async loading
    DISAGG_CONTEXT_TRANS_IN_PROGRESS = "disagg_context_trans_in_progress"        # async saving


@dataclass(eq=False)
class LlmRequest:
    request_id: int
    prompt: List[int]
    max_new_tokens: int
    cache_salt: Optional[str] = None
    cache_salt_id: Optional[int] = None
    is_generation_only_request: bool = False
    state: LlmRequestState = LlmRequestState.CONTEXT_INIT
    context_current_position: int = 0
    generated: List[int] = field(default_factory=list)
    cancelled: bool = False

    @property
    def py_request_id(self) -> int:
        return self.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def py_prompt_len(self) -> int:
        return len(self.prompt)

    def get_tokens(self, beam: int) -> List[int]:
        if beam != 0:
            raise ValueError("beam width 1 only")
        return list(self.prompt) + list(self.generated)

    @property
    def context_remaining_length(self) -> int:
        return len(self.prompt) - self.context_current_position
