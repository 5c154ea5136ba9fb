"""The process tree: lineage kept across exits, pruning, pid reuse, the memory cap; and a
hypothesis state machine against a reference model of which processes are alive."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from probewire.security.tree import MAX_ANCESTRY, Node, ProcessTree


def pids(nodes: list[Node]) -> list[int]:
    return [n.pid for n in nodes]


def test_exec_updates_the_forked_node_and_ancestry_runs_parent_first() -> None:
    t = ProcessTree()
    t.seed({1: (Node(1, 0, exe="/sbin/init"), 0), 100: (Node(100, 5, exe="/usr/bin/bash"), 1)})
    t.fork(200, 100, 10)
    assert t.get(200) is not None and t.get(200).exe == "/usr/bin/bash"  # the parent's image
    t.exec(200, 100, 10, exe="/usr/bin/python3", argv=("python3", "x.py"))
    node = t.get(200)
    assert node is not None and node.exe == "/usr/bin/python3" and not node.seeded
    assert pids(t.ancestry(node)) == [100, 1]


def test_an_exited_parent_stays_while_its_children_live_and_goes_with_the_last() -> None:
    t = ProcessTree()
    t.fork(10, 1, 1)
    t.fork(11, 10, 2)
    t.fork(12, 10, 3)
    t.exit(10, 1)
    child = t.get(11)
    assert child is not None and pids(t.ancestry(child)) == [10]
    assert t.ancestry(child)[0].exited and t.ghosts == 1
    t.exit(11, 2)
    assert t.ghosts == 1  # 12 still needs it
    t.exit(12, 3)
    assert t.ghosts == 0 and len(t) == 0


def test_a_reused_pid_is_a_new_process_and_the_old_one_keeps_its_children() -> None:
    t = ProcessTree()
    t.fork(10, 1, 100)
    t.fork(11, 10, 101)
    t.exec(10, 1, 500, exe="/other")  # pid 10 again, but a different start: a new process
    new, child = t.get(10), t.get(11)
    assert new is not None and child is not None
    assert new.start_ticks == 500 and new.parent is None
    old = t.ancestry(child)[0]
    assert old is not new and old.pid == 10 and old.exited


def test_the_cap_evicts_the_least_recently_seen_and_cuts_ancestry_there() -> None:
    t = ProcessTree(max_nodes=3)
    t.fork(10, 1, 1)
    t.fork(11, 10, 2)
    t.fork(12, 11, 3)
    t.fork(13, 12, 4)  # evicts 10, the least recently seen
    assert t.get(10) is None and len(t) == 3 and t.evicted == 1
    leaf = t.get(13)
    assert leaf is not None
    chain = t.ancestry(leaf)
    # The ancestry ends at 10's stub (an alert shows it as evicted, the lineage truncated).
    assert pids(chain) == [12, 11, 10]
    assert chain[-1].evicted and chain[-1].argv == () and chain[-1].parent is None


def test_a_lineage_of_exited_processes_is_cut_not_grown_without_bound() -> None:
    t = ProcessTree()
    parent = 1
    for i in range(2, 500):  # each process forks the next and exits (a re-forking daemon)
        t.fork(i, parent, i)
        if parent != 1:
            t.exit(parent, parent)
        parent = i
    leaf = t.get(parent)
    assert leaf is not None
    assert len(t.ancestry(leaf, limit=10_000)) <= 2 * MAX_ANCESTRY
    assert t.ghosts <= 2 * MAX_ANCESTRY


def test_fork_within_a_tick_of_the_exec_start_is_the_same_process() -> None:
    """task_newtask's fork record carries the boot clock at the fork, not the child's start."""
    t = ProcessTree()
    t.fork(10, 1, 99)
    node = t.get(10)
    t.exec(10, 1, 100, exe="/x")
    assert t.get(10) is node and node is not None and node.start_ticks == 100


class TreeMachine(RuleBasedStateMachine):
    """Random forks, execs and exits against a model: every live process is in the tree with
    its true parent (while within the cap), nothing exited lingers without children, and the
    node count stays bounded."""

    CAP = 12

    def __init__(self) -> None:
        super().__init__()
        self.tree = ProcessTree(max_nodes=self.CAP)
        self.alive: dict[int, tuple[int, int]] = {}  # pid -> (ppid, start)
        self.clock = 1
        self.next_pid = 2

    def _start(self) -> int:
        self.clock += 1
        return self.clock

    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parents = [1, *self.alive]
        ppid = data.draw(st.sampled_from(parents))
        pid = self.next_pid
        self.next_pid += 1
        start = self._start()
        self.tree.fork(pid, ppid, start)
        self.alive[pid] = (ppid, start)

    @precondition(lambda self: bool(self.alive))
    @rule(data=st.data())
    def exec(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.alive)))
        ppid, start = self.alive[pid]
        self.tree.exec(pid, ppid, start, exe=f"/bin/{pid}")

    @precondition(lambda self: bool(self.alive))
    @rule(data=st.data())
    def exit(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.alive)))
        _, start = self.alive.pop(pid)
        self.tree.exit(pid, start)

    @invariant()
    def bounded_and_consistent(self) -> None:
        assert len(self.tree) <= self.CAP
        for node in self.tree.nodes():
            assert node.pid in self.alive and not node.exited
            chain = self.tree.ancestry(node, limit=10_000)
            assert len(chain) < 10_000  # no cycles
            for anc in chain:
                assert anc.children > 0 or anc.evicted
        if len(self.alive) <= self.CAP:
            # Nothing evicted recently: each live process sits under its true parent, if
            # that parent is still in the tree.
            for pid, (ppid, _) in self.alive.items():
                node = self.tree.get(pid)
                if node is not None and node.parent is not None and not node.parent.evicted:
                    assert node.parent.pid == ppid
        if not self.alive:
            assert self.tree.ghosts == 0


TreeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                         deadline=None)
test_tree_against_a_model_of_live_processes = TreeMachine.TestCase
