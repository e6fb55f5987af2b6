"""The gRPC front door (specserve.SpecServe through Serve's gRPC proxy).

`SpecServeGrpc` is a mixin of the SpecRouter deployment: Serve's gRPC proxy calls its
`Generate` / `GenerateStream` by method name. Like the HTTP routes, they only call
`self.front`; failures become a status code, a clean detail and trailing metadata
(`retry-after` on RESOURCE_EXHAUSTED / UNAVAILABLE, `error-id` on INTERNAL) through
specserve_ray/api/error_map.py.

Binding: Serve's gRPC proxy listens on every interface (its options have a port but no
host field), so a key set with SPECSERVE_API_KEY / front.api_key_file protects gRPC too
(metadata `authorization: Bearer <key>`). Where gRPC is not needed, leave
`grpc_options.grpc_servicer_functions` empty and the proxy serves nothing. Serve's
proxies have no TLS: put a TLS-terminating ingress in front (README, k8s/).
"""
from __future__ import annotations

import contextlib

from specserve_ray.api.inputs import check_text
from specserve_ray.api.validation import sampling_params
from specserve_ray.sampling_params import SamplingParams

from deployments.proto import specserve_pb2 as pb


def _sampling(request) -> SamplingParams:
    sampling = {"max_tokens": request.max_tokens or 64, "temperature": request.temperature,
                "top_p": request.top_p or 1.0, "top_k": request.top_k,
                "stop": list(request.stop), "ignore_eos": request.ignore_eos}
    if request.HasField("seed"):
        sampling["seed"] = request.seed
    return sampling_params(**sampling)   # refusals name the field (RequestError)


def _speculation(summary: dict):
    return pb.SpeculationSummary(**summary)


class GrpcAbort(Exception):
    """Ends a gRPC stream whose code and details are already set on the context."""


class SpecServeGrpc:
    """gRPC methods; mixed into SpecRouter, which sets `front`."""

    def _grpc_call(self, request, grpc_context):
        """Checks shared by both methods; returns the engine arguments."""
        if grpc_context is not None:
            self.front.auth.check_metadata(grpc_context.invocation_metadata())
        overloaded = self.front.refuse_early()     # a full queue: refused before any check
        if overloaded is not None:
            raise overloaded
        check_text(request.prompt, "prompt")          # the proto fixes types, not text
        check_text(request.slo_class, "slo_class")
        k = request.num_speculative_tokens if request.HasField("num_speculative_tokens") else None
        # proto3 strings cannot be unset: empty means none / the default class.
        return (request.prompt or "", _sampling(request), request.request_id or None, k,
                request.slo_class or None)

    def _grpc_fail(self, grpc_context, exc: BaseException, door: str) -> str:
        import grpc

        from specserve_ray.api.error_map import grpc_details, grpc_trailers

        reply = self.front.reply_for(exc, door)
        grpc_context.set_code(getattr(grpc.StatusCode, reply.grpc_code))
        grpc_context.set_details(grpc_details(reply))
        trailers = grpc_trailers(reply)
        if trailers:
            grpc_context.set_trailing_metadata(trailers)
        return grpc_details(reply)

    async def Generate(self, request, grpc_context=None):
        try:
            prompt, params, rid, k, slo_class = self._grpc_call(request, grpc_context)
            r = await self.front.generate(prompt, params, rid, k, slo_class)
            return pb.GenerateResponse(
                request_id=r["request_id"], text=r["text"], token_ids=r["token_ids"],
                finished=True, finish_reason=r["finish_reason"], prompt_tokens=r["prompt_tokens"],
                completion_tokens=r["completion_tokens"],
                speculation=_speculation(r["speculation"]))
        except Exception as exc:  # noqa: BLE001
            if grpc_context is None:
                raise
            self._grpc_fail(grpc_context, exc, "grpc")
            return pb.GenerateResponse()

    async def GenerateStream(self, request, grpc_context=None):
        try:
            prompt, params, rid, k, slo_class = self._grpc_call(request, grpc_context)
            # aclosing: a cancelled call (client gone) aborts the request at once.
            async with contextlib.aclosing(self.front.stream(prompt, params, rid, k,
                                                             slo_class)) as outputs:
                async for out in outputs:
                    yield pb.GenerateResponse(
                        request_id=out.request_id, text=out.new_text,
                        token_ids=out.new_token_ids, finished=out.finished,
                        finish_reason=out.finish_reason or "", prompt_tokens=out.num_prompt_tokens,
                        completion_tokens=out.num_output_tokens,
                        speculation=_speculation(out.spec.summary()))
        except Exception as exc:  # noqa: BLE001
            if grpc_context is None:
                raise
            details = self._grpc_fail(grpc_context, exc, "grpc stream")
            # A stream that yielded nothing carries its status only through an exception:
            # Serve keeps the code set above and sends this clean text as the details.
            raise GrpcAbort(details) from None
