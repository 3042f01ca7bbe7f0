"""The remoting client against a RocketMQ 5.3 broker (its name server and the broker's
own remoting port, not the proxy): the 4.x tests run again there, unchanged. A 5.x
broker still speaks the protocol, so a 5.x cluster without the proxy is served by the
same configuration (``RocketMQConfig(namesrv=...)``). ``scripts/rocketmq up`` creates
the 4.x tests' topics on it as MIXED topics."""

from __future__ import annotations

import pytest

from . import test_rocketmq4 as four

pytestmark = [pytest.mark.rocketmq]


@pytest.fixture(scope="session")
def rocketmq4_namesrv(rocketmq5_namesrv: str) -> str:
    """These tests' name server: the 5.3 broker's."""
    return rocketmq5_namesrv


config = four.config  # the same config fixture, on the name server above

test_commit_is_delivered_with_its_properties_and_rollback_never = \
    four.test_commit_is_delivered_with_its_properties_and_rollback_never
test_a_lost_commit_is_delivered_once_through_the_check_back = \
    four.test_a_lost_commit_is_delivered_once_through_the_check_back
test_a_relay_publishes_outbox_rows_to_the_4x_broker_in_batches = \
    four.test_a_relay_publishes_outbox_rows_to_the_4x_broker_in_batches
test_a_4x_consumer_group_applies_each_message_once_retries_and_dead_letters = \
    four.test_a_4x_consumer_group_applies_each_message_once_retries_and_dead_letters
