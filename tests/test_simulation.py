import logging
import warnings

from flwr.supercore.logger import warn_deprecated_feature

from fedsynth.runtime.processes import quiet_flower


def test_quiet_flower_drops_only_the_messages_a_user_cannot_act_on(caplog):
    quiet_flower()
    logger = logging.getLogger("flwr")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
        logger.warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        logger.warning("a client failed: node 3 timed out")
        warn_deprecated_feature("something else is deprecated")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0] == "a client failed: node 3 timed out"
    assert "something else is deprecated" in messages[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_flower()  # filters are installed again inside the catch_warnings scope
        warnings.warn(
            "Tip: In future versions of Ray, Ray will no longer override", FutureWarning, stacklevel=1
        )
        warnings.warn("another future change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another future change"]


def test_client_module_drops_the_actor_shutdown_line_in_every_process_that_runs_clients(caplog):
    from flwr.simulation.ray_transport.ray_actor import WARNING, log

    import fedsynth.client.app  # noqa: F401  (installs the filter, as in Ray's workers)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        log(WARNING, "Manually terminating %s", "ClientAppActor")  # what Flower's actor logs
        log(WARNING, "ClientApp raised an exception")
    assert [r.getMessage() for r in caplog.records] == ["ClientApp raised an exception"]
