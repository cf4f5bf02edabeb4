"""Infrastructure shared by every role: logging, TLS contexts, retry, files, and the
AMQP link. Nothing here knows about sessions or tunnels."""
