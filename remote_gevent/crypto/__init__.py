"""Keys and crypto: the ED25519 identity (``identity``), trusted operator keys
(``authkeys``), and the tunnel's key exchange and frame sealing (``tunnel_crypto``)."""
