"""The toy world fastdm's quality is measured in: the generator of one-object clips (``world``: colours, shapes,
directions, the renderer, the shapes models' architecture), its weight-free metrics (``metrics``: object mask,
colour and shape classifiers, centroid drift) and the edit suite built from them (``suite``). The editor itself
(backbones, losses, driver) never imports it; tests, benchmarks and the training tools do."""
