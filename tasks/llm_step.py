"""The generic Prefect task of the runtime, for use in your own flows.

``llm_step`` runs the LLM-assisted loop for one spec task; the compiler
(:mod:`toka.compiler`) specialises it per spec task with ``.with_options``.
It is defined in the core package (:mod:`toka.llm_step`), which the compiled
flows use; this module names it where the project layout expects Prefect tasks.
"""

from toka.llm_step import StepCachePolicy, StepInput, is_retryable, llm_step

__all__ = ["StepCachePolicy", "StepInput", "is_retryable", "llm_step"]
