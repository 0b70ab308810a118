"""The expert service: feed-forward experts of MoE layers served over gRPC
(``cleave.v1.Expert``), and :class:`~cleave.expert.client.RemoteExpertBackend`, the
engine's side of it."""
