// Waiting for the device without blocking the event loop (Event.query, the synchronizeAsync
// family, Tensor.downloadAsync) on the host backend, whose streams run behind the caller as a
// device does: the results are download()'s bits, long work is awaited while other callbacks run,
// the bookkeeping of streams holds up, an event may be disposed with records still queued, and
// bad calls reject with an FmoeError naming the argument.
// test/cuda.test.ts checks the same waits on a device.
import { describe, expect } from "bun:test";
import { Context, FusedMoE, Status } from "../lib/index.ts";
import { countEventLoopTurns, expectBitExact, expectFmoe, expectFmoeRejects, layerWithInput, queueLongWork, randBf16, randWeights, seededTest, suiteContext } from "./helpers.ts";

const ARG = Status.INVALID_ARGUMENT;
const STATE = Status.INVALID_STATE;

describe("waiting without blocking (host)", () => {
  const ctx = suiteContext("host");

  seededTest("downloadAsync and toFloat32Async give download()'s bits, on a stream and on all of them", async (rng) => {
    const x = ctx();
    const T = 1 + rng.int(40);
    using layer = layerWithInput(x, rng, T, 96, 6, { maxTokens: 64 });
    const { H, moe, hidden, routingMap, probs } = layer;
    using stream = x.createStream();
    using out = moe.forward({ hidden, routingMap, probs, stream });
    const blocking = out.download(stream);
    expectBitExact(await out.downloadAsync(stream), blocking, "downloadAsync(stream)");
    expectBitExact(await out.downloadAsync(), blocking, "downloadAsync()");
    expectBitExact(await out.toFloat32Async(stream, { spinMs: 0 }), out.toFloat32(), "toFloat32Async");
    // A view downloads only its elements.
    const row = out.view(H * (T - 1), [H]);
    expectBitExact(await row.downloadAsync(), blocking.subarray(H * (T - 1)), "a view's last row");
  });

  seededTest("long queued work is awaited while the event loop turns; an event is complete once its stream reaches it", async (rng) => {
    const x = ctx();
    using never = x.createEvent();
    expect(never.query()).toBe(true);
    await never.synchronizeAsync();
    // Host streams run their work on threads of their own: four products of 512^3 (~0.1 s on two
    // cores) are still running when the host looks.
    using work = queueLongWork(x, rng, 512, 512, 512, 4);
    expect(work.done.query()).toBe(false);
    const turns = countEventLoopTurns();
    const awaited = await work.out.downloadAsync(work.stream);
    expect(turns()).toBeGreaterThan(0);
    expect(work.done.query()).toBe(true);
    expectBitExact(awaited, work.out.download(work.stream), "downloadAsync after four queued products");
    using again = x.createEvent().record(work.stream);
    await again.synchronizeAsync({ spinMs: 0 });
    expect(again.query()).toBe(true);
  });

  seededTest("a layer's call on another stream while its last one may still run is refused; after it, or on the same stream, it runs", async (rng) => {
    const x = ctx();
    const [T, E] = [1 + rng.int(20), 4];
    using layer = layerWithInput(x, rng, T, 32, E, { router: {} });
    const { H, moe, hidden, routingMap, probs } = layer;
    using logits = x.upload(rng.f32Normal(T * E), [T, E], "f32");
    using alone = moe.forward({ hidden, routingMap, probs });
    const expected = alone.download();
    // The first call queues behind ~0.1 s of products on its stream: still running when the
    // second comes, which would share the layer's workspace (and its routed buffers) with it.
    using work = queueLongWork(x, rng, 512, 512, 512, 4);
    using first = moe.forward({ hidden, routingMap, probs, stream: work.stream });
    using other = x.createStream();
    expectFmoe(() => moe.forward({ hidden, routingMap, probs, stream: other }), STATE, "FusedMoE.forward", "previous call, on another stream, may still be running");
    expectFmoe(() => moe.forward({ hidden, routerLogits: logits }), STATE, "FusedMoE.forward", "another stream");
    using tpe = x.upload(Int32Array.of(T, 0, 0, 0), [E], "i32");
    using rowProbs = x.upload(Float32Array.from({ length: T }, () => 1), [T], "f32");
    expectFmoe(() => moe.forwardGrouped({ hidden, tokensPerExpert: tpe, probs: rowProbs, stream: other }), STATE, "FusedMoE.forwardGrouped", "another stream");
    // Capturing on another stream runs nothing, so it is not refused.
    using out = x.empty([T, H], "bf16");
    using graph = moe.capture({ hidden, routingMap, probs, out, stream: other });
    using again = moe.forward({ hidden, routingMap, probs, stream: work.stream }); // same stream: queued in order
    expect(work.done.query()).toBe(false);
    expectBitExact(await again.downloadAsync(work.stream), expected, "the call queued behind the first, on its stream");
    expectBitExact(first.download(), expected, "the first call");
    using later = moe.forward({ hidden, routingMap, probs, stream: other }); // the first has finished
    expectBitExact(later.download(other), expected, "the call on the other stream, after the first");
    graph.launch(other);
    expectBitExact(out.download(other), expected, "the graph captured meanwhile");
  });

  seededTest("a graph's replay counts as a call of each layer captured in it: refused on another stream while the layer's last call may still run, and it refuses the next call there", async (rng) => {
    const x = ctx();
    const T = 1 + rng.int(20);
    using layer = layerWithInput(x, rng, T, 32, 4);
    const { H, moe, hidden, routingMap, probs } = layer;
    using idle = new FusedMoE(x, layer.config, { fc1: layer.fc1, fc2: layer.fc2 });
    using alone = moe.forward({ hidden, routingMap, probs });
    const expected = alone.download();
    using other = x.createStream();
    using out = x.empty([T, H], "bf16");
    using out2 = x.empty([T, H], "bf16");
    // One graph, two layers: each is guarded on its own (`idle` has never run).
    using graph = x.capture(other, () => {
      moe.forward({ hidden, routingMap, probs, out, stream: other });
      idle.forward({ hidden, routingMap, probs, out: out2, stream: other });
    });
    // The layer's call queued behind ~0.3 s of products on its stream: a replay elsewhere would
    // share its workspace with it. (Each refusal below after a replay first waits up to 20 ms.)
    using work = queueLongWork(x, rng, 512, 512, 512, { lastingMs: 300 });
    using first = moe.forward({ hidden, routingMap, probs, stream: work.stream });
    out.fill(0xff, other);
    const refused = "a FusedMoE captured in this graph: the layer's previous call, on another stream, may still be running";
    expectFmoe(() => graph.launch(other), STATE, "Graph.launch", refused);
    expectFmoe(() => graph.launch(), STATE, "Graph.launch", "another stream");
    expect(new Uint16Array(out.download(other)).every((v) => v === 0xffff)).toBe(true); // nothing launched
    // On the layer's stream the replay queues behind the call, and becomes the layer's last call:
    // both layers' next calls elsewhere are refused until it has run.
    graph.launch(work.stream);
    expect(work.done.query()).toBe(false);
    expectFmoe(() => moe.forward({ hidden, routingMap, probs, stream: other }), STATE, "FusedMoE.forward", "previous call, on another stream, may still be running");
    expectFmoe(() => idle.forward({ hidden, routingMap, probs, stream: other }), STATE, "FusedMoE.forward", "another stream");
    expectBitExact(await out.downloadAsync(work.stream), expected, "the replay queued behind the call");
    expectBitExact(out2.download(work.stream), expected, "the second layer's replay");
    expectBitExact(first.download(), expected, "the call");
    // Once it has run: the replay on the other stream, and the layers' calls after it there.
    out.fill(0xff, other);
    graph.launch(other);
    using later = moe.forward({ hidden, routingMap, probs, stream: other });
    expectBitExact(out.download(other), expected, "the replay on the other stream");
    expectBitExact(later.download(other), expected, "the call after it, on its stream");
    // A replay's stream that has finished lets the next call elsewhere run at once (the replay
    // records nothing itself; that call records and checks it).
    graph.launch(other);
    await other.synchronizeAsync();
    using elsewhere = moe.forward({ hidden, routingMap, probs, stream: work.stream });
    expectBitExact(elsewhere.download(work.stream), expected, "a call on another stream after the replay ran");
    // A replay on a stream disposed since: the call elsewhere waits for the context's work, then runs.
    const brief = x.createStream();
    graph.launch(brief);
    brief.dispose();
    using afterDisposed = moe.forward({ hidden, routingMap, probs, stream: other });
    expectBitExact(afterDisposed.download(other), expected, "a call after a replay on a disposed stream");
    expectBitExact(out.download(), expected, "that replay");
    // A replay on a stream that captures now: whether it has run cannot be asked there, so a call
    // elsewhere is refused until the capture ends.
    graph.launch(work.stream);
    await work.stream.synchronizeAsync();
    using capturedFill = x.capture(work.stream, () => {
      out2.fill(0, work.stream);
      expectFmoe(() => moe.forward({ hidden, routingMap, probs, out: later, stream: other }), STATE, "FusedMoE.forward", "another stream");
    });
    using last = moe.forward({ hidden, routingMap, probs, stream: other });
    expectBitExact(last.download(other), expected, "a call once the capture has ended");
  });

  seededTest("an event's newest record decides whether it is complete, as on CUDA", async (rng) => {
    const x = ctx();
    using work = queueLongWork(x, rng, 512, 512, 512, 4);
    using idle = x.createStream();
    using e = x.createEvent();
    e.record(idle).record(work.stream);
    expect(e.query()).toBe(false); // the newest record waits behind the work
    e.record(idle);
    await e.synchronizeAsync(); // the newest record is on an idle stream
    expect(work.done.query()).toBe(false); // ~0.1 s of products still running
  });

  seededTest("an event disposed with a record still queued: the dispose does not wait, and that record, or one captured into a graph and replayed later, touches no freed event", (rng) => {
    // (scripts/host-sanitize.sh runs this under AddressSanitizer: a record written into a freed
    // event stops the run.)
    const x = ctx();
    using work = queueLongWork(x, rng, 512, 512, 512, 4);
    x.createEvent().record(work.stream).dispose();
    expect(work.done.query()).toBe(false); // a dispose that waited for the record would see it done
    using s = x.createStream();
    const captured = x.createEvent();
    using graph = x.capture(s, () => void captured.record(s));
    captured.dispose();
    graph.launch(s);
    graph.launch(work.stream);
    s.synchronize();
    work.stream.synchronize();
  });

  seededTest("Context.synchronizeAsync waits on the live streams only: disposed ones are forgotten", async () => {
    // A stream left in the context's set after dispose would make the next wait record an event on
    // a destroyed stream, which the library refuses ("not a live stream").
    using x = Context.create("host");
    const a = x.createStream();
    const b = x.createStream();
    const c = x.createStream();
    await x.synchronizeAsync();
    b.dispose();
    await x.synchronizeAsync();
    a.dispose();
    c.dispose();
    await x.synchronizeAsync();
    using d = x.createStream();
    using t = x.zeros([8], "i32", d);
    expect(Array.from(await t.downloadAsync())).toEqual(new Array(8).fill(0));
  });

  seededTest("synchronizeAsync polls until the event completes and lets other callbacks run meanwhile", async (rng) => {
    // The host's events are always complete, so this event reports "not yet" for its first polls,
    // as a CUDA event does while its work runs.
    const x = ctx();
    for (const spinMs of [5, 0]) {
      using e = x.createEvent();
      const polls = 3 + rng.int(6);
      let calls = 0;
      e.query = () => ++calls > polls;
      const turns = countEventLoopTurns();
      await e.synchronizeAsync({ spinMs });
      expect(turns()).toBeGreaterThan(0);
      expect(calls).toBe(polls + 1);
    }
  });

  seededTest("bad waits reject with FmoeError naming the argument", async (rng) => {
    const x = ctx();
    using e = x.createEvent();
    await expectFmoeRejects(e.synchronizeAsync({ spinMs: -1 }), ARG, "spinMs", "-1");
    await expectFmoeRejects(e.synchronizeAsync({ spinMs: Number.NaN }), ARG, "spinMs");
    await expectFmoeRejects(e.synchronizeAsync({ spinms: 1 } as never), ARG, '"spinms"', "spinMs");
    await expectFmoeRejects(x.synchronizeAsync({ poll: 1 } as never), ARG, '"poll"');
    using t = x.upload(randBf16(rng, 16), [16], "bf16");
    using other = Context.create("host");
    using foreign = other.createStream();
    await expectFmoeRejects(t.downloadAsync(foreign), ARG, "downloadAsync", "another context");

    const gone = x.createEvent();
    gone.dispose();
    expect(() => gone.query()).toThrow("event is disposed");
    await expectFmoeRejects(gone.synchronizeAsync(), STATE, "event is disposed");
    const s = x.createStream();
    s.dispose();
    await expectFmoeRejects(s.synchronizeAsync(), STATE, "stream is disposed");
    // Disposed before the wait ends: the copy is refused, not made from freed memory.
    const u = x.upload(randBf16(rng, 16), [16], "bf16");
    const pending = u.downloadAsync();
    u.dispose();
    await expectFmoeRejects(pending, STATE, "downloadAsync");
    // A layer disposed while its counter is awaited: refused, not read from its freed plan.
    const fc1 = x.upload(randWeights(rng, 2, 32, 32), [2, 32, 32], "bf16");
    const fc2 = x.upload(randWeights(rng, 2, 32, 32), [2, 32, 32], "bf16");
    const moe = new FusedMoE(x, { hidden: 32, ffn: 32, numExperts: 2, topk: 1, activation: "squared_relu", maxTokens: 4 }, { fc1, fc2 });
    const count = moe.invalidCountAsync();
    moe.dispose();
    await expectFmoeRejects(count, STATE, "FusedMoE is disposed");
    for (const t of [fc1, fc2]) t.dispose();
    // The context itself disposed while a wait is pending.
    const y = Context.create("host");
    using v = y.zeros([4], "f32");
    const waiting = v.downloadAsync();
    y.dispose();
    await expectFmoeRejects(waiting, STATE, "disposed");
  });
});
