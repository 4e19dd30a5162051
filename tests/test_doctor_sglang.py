"""`irminsul doctor` against SGLang with the irminsul backend: no capability probe, the policy is
the server's, ``full`` and ``prefix`` come from a fresh ``extra_key`` partition, and the moved
content is reached through a pre-warm request. The server here is a real aiohttp app on
127.0.0.1 that answers as SGLang 0.5.23 with the backend does, by the backend's rules
(engine_adapter/sglang/DESIGN.md): per-``extra_key`` exact prefix, then one run of chunk hits
right after it, chunked over the token IDs alone, reported in
``meta_info.cached_tokens_details.irminsul``. The backend itself is tested on SGLang's own
classes (tests/test_sglang_backend.py); this tests the doctor's side."""

from __future__ import annotations

from aiohttp import web

from irminsul.chunking.config import ChunkerConfig
from irminsul.chunking.keys import Chunker
from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.engine_adapter.doctor_checks import FAIL, PASS, DoctorConfig, run_doctor


class BackendLike:
    """SGLang + irminsul backend, as far as /generate, /server_info and the probe go."""

    def __init__(self, backend: str = "irminsul", place: bool = True):
        self.backend, self.place = backend, place
        self.history: dict[str, list[list[int]]] = {}  # extra_key -> prompts, in order
        self.received: list[dict] = []
        self.chunker = Chunker(ChunkerConfig())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/server_info", self.server_info)
        app.router.add_post("/generate", self.generate)
        return app  # /irminsul/capabilities: 404, as SGLang answers

    async def server_info(self, _):
        return web.json_response({"model_path": "m", "memory": {
            "radix_cache_backend": self.backend}, "version": "0.5.23"})

    def _split(self, ids: list[int], part: str) -> ReuseCounts | None:
        earlier = self.history.get(part, [])
        exact = 0
        for prev in earlier:
            n = 0
            while n < min(len(prev), len(ids)) and prev[n] == ids[n]:
                n += 1
            exact = max(exact, n)
        exact = min(exact, len(ids) - 1)
        seen = {tuple(p[c.start:c.end]) for p in earlier for c in self.chunker.split(p)}
        run = 0
        if self.place:
            for c in self.chunker.split(ids):
                if c.start < exact + run:
                    continue
                if c.start != exact + run or tuple(ids[c.start:c.end]) not in seen:
                    break
                run = min(c.end, len(ids) - 1) - exact
        self.exact = exact
        if run <= 0:
            return None
        return ReuseCounts(prompt_tokens=len(ids), exact_prefix_tokens=exact, reused_tokens=run,
                           new_tokens=len(ids) - exact - run, policy="pic")

    async def generate(self, request: web.Request):
        body = await request.json()
        self.received.append(body)
        ids, part = list(body["input_ids"]), str(body.get("extra_key") or "")
        counts = self._split(ids, part)
        self.history.setdefault(part, []).append(ids)
        n = body["sampling_params"]["max_new_tokens"]
        meta = {"prompt_tokens": len(ids), "completion_tokens": n, "cached_tokens": self.exact}
        if counts is not None:
            meta["cached_tokens_details"] = {"irminsul": counts.to_json()}
        out = [(sum(ids) + i) % 997 for i in range(n)]  # the same prompt, the same output
        return web.json_response({"text": "", "output_ids": out, "meta_info": meta})


async def _doctor(aiohttp_server, fake: BackendLike, **kw):
    server = await aiohttp_server(fake.app())
    cfg = DoctorConfig(upstream=str(server.make_url("")), seed=4, content_tokens=1024, **kw)
    return await run_doctor(cfg)


async def test_doctor_checks_sglang_with_the_backend(aiohttp_server):
    fake = BackendLike()
    report = await _doctor(aiohttp_server, fake)
    status = {c.name: c.status for c in report.checks}
    assert report.ok, status
    assert status["content hits reported"] == PASS and status["pre-warm point"] == PASS
    bodies = fake.received
    assert [b["sampling_params"]["max_new_tokens"] for b in bodies] == [16, 0, 16, 16, 16]
    reuse, fresh = bodies[0]["extra_key"], bodies[3]["extra_key"]
    assert reuse != fresh and {b["extra_key"] for b in bodies[:3]} == {reuse}
    assert bodies[1]["input_ids"] == bodies[2]["input_ids"][: len(bodies[1]["input_ids"])]


async def test_doctor_fails_a_backend_that_places_nothing(aiohttp_server):
    report = await _doctor(aiohttp_server, BackendLike(place=False))
    status = {c.name: c.status for c in report.checks}
    assert not report.ok and status["content hits reported"] == FAIL
    assert status["full = prefix on an exact repeat"] == PASS


async def test_sglang_without_the_backend_fails_the_probe(aiohttp_server):
    report = await _doctor(aiohttp_server, BackendLike(backend=None))
    assert [(c.name, c.status) for c in report.checks] == [("capability probe", FAIL)]
