# pragma version 0.4.3
# @title fedsynth round protocol (BlockLearning's phases, Senden 2025's decentralized paradigm)
# @notice The owner (deployer) starts rounds naming the trainers and aggregators that take
#         part; selected trainers submit the content ID (CID) of their update once; selected
#         aggregators submit the CID of their aggregate; the round's new model is the CID that
#         more than half of the round's aggregators submitted. Only CIDs go on chain; the
#         weights live in a content-addressed store. Every transition emits an event.
#
# Phases: Stopped -> WaitingForUpdates (startRound) -> WaitingForAggregations (all selected
# trainers submitted, or the owner closes after the update deadline) -> WaitingForTermination
# (a majority of aggregators agree) -> Stopped (terminateRound). The owner may cancel a round
# whose aggregators did not agree by the aggregation deadline (the model stays unchanged).

STOPPED: constant(uint8) = 0
WAITING_FOR_UPDATES: constant(uint8) = 1
WAITING_FOR_AGGREGATIONS: constant(uint8) = 2
WAITING_FOR_TERMINATION: constant(uint8) = 3

TRAINER: constant(uint8) = 1
AGGREGATOR: constant(uint8) = 2

MAX_NODES: constant(uint256) = 128
CID_BYTES: constant(uint256) = 128
METRICS_BYTES: constant(uint256) = 256

event Registered:
    node: indexed(address)
    role: uint8

event RoundStarted:
    round: indexed(uint256)
    model: String[CID_BYTES]
    trainers: DynArray[address, MAX_NODES]
    aggregators: DynArray[address, MAX_NODES]
    updatesDeadline: uint256
    aggregationDeadline: uint256

event UpdateSubmitted:
    round: indexed(uint256)
    trainer: indexed(address)
    cid: String[CID_BYTES]
    dataPoints: uint256
    metrics: String[METRICS_BYTES]

event UpdatesClosed:
    round: indexed(uint256)
    updates: uint256

event AggregationSubmitted:
    round: indexed(uint256)
    aggregator: indexed(address)
    cid: String[CID_BYTES]
    votes: uint256

event AggregationAgreed:
    round: indexed(uint256)
    cid: String[CID_BYTES]
    votes: uint256

event RoundTerminated:
    round: indexed(uint256)
    model: String[CID_BYTES]

event RoundCancelled:
    round: indexed(uint256)
    reason: String[64]

owner: public(address)
phase: public(uint8)
round: public(uint256)
model: public(String[CID_BYTES])
agreed: public(String[CID_BYTES])
isTrainer: public(HashMap[address, bool])
isAggregator: public(HashMap[address, bool])
trainers: public(DynArray[address, MAX_NODES])
aggregators: public(DynArray[address, MAX_NODES])
updatesDeadline: public(uint256)
aggregationDeadline: public(uint256)
aggregationSeconds: public(uint256)
updateCount: public(uint256)
aggregationCount: public(uint256)

selectedTrainer: HashMap[uint256, HashMap[address, bool]]
selectedAggregator: HashMap[uint256, HashMap[address, bool]]
submittedUpdate: HashMap[uint256, HashMap[address, bool]]
submittedAggregation: HashMap[uint256, HashMap[address, bool]]
updateCid: public(HashMap[uint256, HashMap[address, String[CID_BYTES]]])
updateDataPoints: public(HashMap[uint256, HashMap[address, uint256]])
votes: HashMap[uint256, HashMap[bytes32, uint256]]


@deploy
def __init__(initial_model: String[CID_BYTES], rounds_done: uint256):
    # rounds_done > 0 continues a run from a checkpoint: round numbers stay the run's own
    self.owner = msg.sender
    self.model = initial_model
    self.round = rounds_done


@external
def registerTrainer():
    assert not self.isTrainer[msg.sender], "already registered as trainer"
    self.isTrainer[msg.sender] = True
    log Registered(node=msg.sender, role=TRAINER)


@external
def registerAggregator():
    assert not self.isAggregator[msg.sender], "already registered as aggregator"
    self.isAggregator[msg.sender] = True
    log Registered(node=msg.sender, role=AGGREGATOR)


@external
def startRound(
    trainers: DynArray[address, MAX_NODES],
    aggregators: DynArray[address, MAX_NODES],
    update_seconds: uint256,
    aggregation_seconds: uint256,
):
    assert msg.sender == self.owner, "only the owner starts rounds"
    assert self.phase == STOPPED, "a round is in progress"
    assert len(trainers) > 0, "no trainers"
    assert len(aggregators) > 0, "no aggregators"
    r: uint256 = self.round + 1
    for t: address in trainers:
        assert self.isTrainer[t], "not a registered trainer"
        assert not self.selectedTrainer[r][t], "trainer selected twice"
        self.selectedTrainer[r][t] = True
    for a: address in aggregators:
        assert self.isAggregator[a], "not a registered aggregator"
        assert not self.selectedAggregator[r][a], "aggregator selected twice"
        self.selectedAggregator[r][a] = True
    self.round = r
    self.trainers = trainers
    self.aggregators = aggregators
    self.updateCount = 0
    self.aggregationCount = 0
    self.agreed = ""
    self.updatesDeadline = block.timestamp + update_seconds
    self.aggregationSeconds = aggregation_seconds
    self.aggregationDeadline = self.updatesDeadline + aggregation_seconds
    self.phase = WAITING_FOR_UPDATES
    log RoundStarted(
        round=r,
        model=self.model,
        trainers=trainers,
        aggregators=aggregators,
        updatesDeadline=self.updatesDeadline,
        aggregationDeadline=self.aggregationDeadline,
    )


@internal
def _closeUpdates():
    self.phase = WAITING_FOR_AGGREGATIONS
    self.aggregationDeadline = block.timestamp + self.aggregationSeconds  # the window starts now
    log UpdatesClosed(round=self.round, updates=self.updateCount)


@external
def submitUpdate(cid: String[CID_BYTES], data_points: uint256, metrics: String[METRICS_BYTES]):
    r: uint256 = self.round
    assert self.phase == WAITING_FOR_UPDATES, "not accepting updates"
    assert self.selectedTrainer[r][msg.sender], "not a selected trainer"
    assert not self.submittedUpdate[r][msg.sender], "update already submitted"
    assert len(cid) > 0, "empty cid"
    self.submittedUpdate[r][msg.sender] = True
    self.updateCid[r][msg.sender] = cid
    self.updateDataPoints[r][msg.sender] = data_points
    self.updateCount += 1
    log UpdateSubmitted(round=r, trainer=msg.sender, cid=cid, dataPoints=data_points, metrics=metrics)
    if self.updateCount == len(self.trainers):
        self._closeUpdates()


@external
def closeUpdates():
    assert msg.sender == self.owner, "only the owner closes updates"
    assert self.phase == WAITING_FOR_UPDATES, "not accepting updates"
    assert block.timestamp >= self.updatesDeadline, "update deadline not reached"
    assert self.updateCount > 0, "no update arrived"
    self._closeUpdates()


@external
def submitAggregation(cid: String[CID_BYTES]):
    r: uint256 = self.round
    assert self.phase == WAITING_FOR_AGGREGATIONS, "not accepting aggregations"
    assert self.selectedAggregator[r][msg.sender], "not a selected aggregator"
    assert not self.submittedAggregation[r][msg.sender], "aggregation already submitted"
    assert len(cid) > 0, "empty cid"
    self.submittedAggregation[r][msg.sender] = True
    self.aggregationCount += 1
    key: bytes32 = keccak256(cid)
    count: uint256 = self.votes[r][key] + 1
    self.votes[r][key] = count
    log AggregationSubmitted(round=r, aggregator=msg.sender, cid=cid, votes=count)
    if 2 * count > len(self.aggregators):
        self.agreed = cid
        self.phase = WAITING_FOR_TERMINATION
        log AggregationAgreed(round=r, cid=cid, votes=count)


@external
def terminateRound():
    assert msg.sender == self.owner, "only the owner terminates rounds"
    assert self.phase == WAITING_FOR_TERMINATION, "no agreed aggregation"
    self.model = self.agreed
    self.phase = STOPPED
    log RoundTerminated(round=self.round, model=self.model)


@external
def cancelRound(reason: String[64]):
    assert msg.sender == self.owner, "only the owner cancels rounds"
    assert self.phase == WAITING_FOR_UPDATES or self.phase == WAITING_FOR_AGGREGATIONS, "nothing to cancel"
    if self.phase == WAITING_FOR_UPDATES:
        assert block.timestamp >= self.updatesDeadline, "update deadline not reached"
    else:
        assert block.timestamp >= self.aggregationDeadline, "aggregation deadline not reached"
    self.phase = STOPPED
    log RoundCancelled(round=self.round, reason=reason)


@view
@external
def isSelectedTrainer(r: uint256, node: address) -> bool:
    return self.selectedTrainer[r][node]


@view
@external
def isSelectedAggregator(r: uint256, node: address) -> bool:
    return self.selectedAggregator[r][node]


@view
@external
def hasSubmittedUpdate(r: uint256, node: address) -> bool:
    return self.submittedUpdate[r][node]


@view
@external
def hasSubmittedAggregation(r: uint256, node: address) -> bool:
    return self.submittedAggregation[r][node]


@view
@external
def votesFor(r: uint256, cid: String[CID_BYTES]) -> uint256:
    return self.votes[r][keccak256(cid)]
