"""mqtt-kafka-bridge: at-least-once MQTT to Kafka, ack after durable."""

__version__ = "0.1.0"
