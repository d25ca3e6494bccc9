"""roe serve: an OpenAI-compatible HTTP server (completions, chat completions, streaming) over RoE.

One worker thread owns the model. A request passes the Host and API-key checks (guard.py), is
read with its size capped, parsed and tokenised off the event loop (protocol.py: every problem a
4xx, bounded prompt and cost), becomes one ``Job`` per choice, and waits in a bounded queue (429
when full). The worker schedules by decode step:
jobs join a running group of the same roster settings (up to ``max_batch`` rows sharing each
forward, whatever their seeds and sampling) between steps, the groups take turns one step each,
and each step's token goes back to the waiting request. The worker checks eos, stop strings and
``max_tokens`` incrementally (roe/stopping.py) and sends a job's finish with its last token; the
request turns tokens into text once each (text.py). The engine gives a prompt the same tokens in a batch as alone,
so a response never depends on its batch-mates or on when it joined.

RoE settings are extra request fields (``roster_size``, ``tau``, ``schedule``: a name the
operator registered, never a path, ``seed``, ``skip_first``, ``skip_last``) with the server's
defaults. ``n`` > 1 gives choice i the seed
``seed + i``. ``logprobs`` (completions: a count; chat: ``logprobs``/``top_logprobs``) report
the log-probability of each generated token under the RoE aggregate the engine chose it from
(the members' averaged distribution, before temperature and top-p), and the most likely
alternatives. This module knows nothing of routers or caches. FastAPI and uvicorn are imported
lazily: ``pip install 'roe[serve]'``.
"""

from roe.serve.app import Service, create_app, registered_schedules, require_serve_extra, run
from roe.serve.protocol import ApiError, Parsed, Sampling, ServeConfig, chat_prompt_ids, parse_request
from roe.serve.text import ChoiceText, token_bytes, token_text
from roe.serve.worker import Job, Worker

__all__ = ["ApiError", "ChoiceText", "Job", "Parsed", "Sampling", "ServeConfig", "Service", "Worker",
           "chat_prompt_ids", "create_app", "parse_request", "registered_schedules", "require_serve_extra", "run",
           "token_bytes", "token_text"]
