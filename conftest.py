"""Root pytest configuration: shared fixtures for real servers live in tests/."""

pytest_plugins = ["tests.fixtures_pg", "tests.fixtures_nats", "tests.fixtures_kafka"]
