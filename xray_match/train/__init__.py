"""xray_match.train: plain PyTorch, no Ray: the shared loop (``loop``), the checkpoint file
(``checkpoint``) and the contract a method implements (``recipe``). Ray runs them from
:mod:`xray_match.driver`."""
