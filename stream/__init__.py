"""beatstream on Kafka: event codec, broker, stream and encoder workers, Feast sink."""
