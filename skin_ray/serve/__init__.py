"""Online prediction: a Ray Serve application behind Ray's HAProxy ingress, in one of two layouts.

    fused (default):  HAProxy -> Ingress (FastAPI: guard, decode, batch, predict)
    split:            HAProxy -> Ingress (guard, decode, batch) --uint8 batches--> SkinModel (predict), one per version

The fused layout is the fastest on one node: no hop between processes, decoding on threads beside the
forward pass. The split layout scales decoding (Ingress replicas on CPU nodes) apart from the model
(SkinModel replicas, e.g. on GPU nodes) on a cluster. Both batch in the Ingress, so a batch is formed where the
requests are, and the model receives whole batches. One service may serve several versions of the model, with
traffic shares, shadows and pinning. Run it with `skin-ray serve`, or with Ray's own CLI:
`serve run deployments/serve_config.yaml`.

One module per duty:
    deployments  the Serve deployments (Ingress, SkinModel) and app_builder, the entry point
    routes       the HTTP routes: what each reads and answers
    schemas      the answers' models and the OpenAPI document's fragments
    guard        what every request passes first: drain, framing, API keys, room, upload bounds
    errors       refusals as JSON, and the exception handlers
    versions     the served versions and the traffic rule that picks one
    batching     dynamic batching and the replica's image budget
    backends     where forward passes run: in this process or in a SkinModel replica
    telemetry    the Prometheus series
    audit        the audit trail: a line per image answered or refused, written off the request path
    lifecycle    `skin-ray serve`: checks before Ray starts, running until a signal, the drain
"""



def __getattr__(name: str):
    """`app_builder` (what `import_path: skin_ray.serve:app_builder` names), imported when asked for, so the
    plain-asyncio modules (guard, batching) load without the deployments and what they import."""
    if name == "app_builder":
        from skin_ray.serve.deployments import app_builder

        return app_builder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
