//! Event time against wrong clocks: a message from the future is
//! dead-lettered instead of moving time, and a source ahead of the others
//! (inside the bound) does not make their samples late. Real RabbitMQ in,
//! real VictoriaMetrics out, exact totals.

use std::sync::atomic::Ordering;

use wagg::pipeline::event_time::wall_now;
use wagg::source::generator::{Generator, GeneratorConfig};
use wagg_tests::VictoriaMetrics;

use crate::amqp::{Names, ready};
use crate::faults::metric;
use crate::harness::{WIDTH, compare, expected, publish, read_back, start_default as start};

fn message(pop: &str, host: &str, time: u64, customer: u64, count: u32) -> Vec<u8> {
    format!(
        r#"{{"pop":"{pop}","host":"{host}","time":{time},"metrics":[{{"customer":{customer},"zone":"z.example","record":"www.z.example","type":"A","count":{count}}}]}}"#
    )
    .into_bytes()
}

/// Before `max_future_secs`, one message dated a day ahead moved the
/// watermark a day: every later sample was late, and the checkpoint kept it
/// so across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clock_a_day_ahead_made_every_later_sample_late() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("day_ahead");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = start(&names, &vm, data.path()).await;
    let mut generator = Generator::new(
        GeneratorConfig {
            customers: 40,
            metrics_per_message: 10,
            seed: 21,
            ..GeneratorConfig::default()
        },
        WIDTH,
    )
    .unwrap();
    let t0 = wall_now() - 3600;
    let honest: Vec<Vec<u8>> = (0..600u64).map(|i| generator.message(t0 + i / 3)).collect();
    let mut all = honest.clone();
    all.insert(300, generator.message(wall_now() + 86_400));
    publish(&names, &all).await;

    let want = expected(&honest, WIDTH);
    running.wait_points(want.len()).await;
    let counters = running.counters.clone();
    let metrics = running.metrics.clone();
    running.stop().await;
    compare(&read_back(&vm).await, &want);
    assert_eq!(counters.late_samples.load(Ordering::Relaxed), 0);
    assert_eq!(counters.dead_lettered.load(Ordering::Relaxed), 1);
    let text = metrics.render();
    assert_eq!(
        metric(
            &text,
            "wagg_messages_dead_lettered_total",
            &[("reason", "from_future")]
        ),
        1.0
    );
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");
    assert_eq!(
        ready(&names.dlq()).await,
        1,
        "the day-ahead one dead-lettered"
    );

    // After a restart the watermark reads what the checkpoint holds (it
    // read 0 until the first flush), and it is the honest sources' time.
    let flushed = metric(&text, "wagg_flushed_watermark_seconds", &[]);
    assert!(
        flushed > t0 as f64 && flushed < wall_now() as f64,
        "{flushed}"
    );
    let again = start(&names, &vm, data.path()).await;
    // The pipeline task reads the checkpoint once it runs: wait for that,
    // not for a flush (there is nothing to flush).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let restored = loop {
        let v = metric(
            &again.metrics.render(),
            "wagg_flushed_watermark_seconds",
            &[],
        );
        if v != 0.0 || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let flushes = again.counters.flushes.load(Ordering::Relaxed);
    again.stop().await;
    assert_eq!((restored, flushes), (flushed, 0), "restored, not flushed");
}

/// Ten honest sources in step, one an hour ahead (past `max_future_secs`:
/// dead-lettered) and one four minutes ahead (inside it: counted). With one
/// watermark for all, the four-minute one made the honest sources' later
/// samples late; with a watermark per source they stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_an_hour_ahead_among_ten_honest_ones_leaves_their_totals_exact() {
    wagg_tests::require_rabbitmq();
    let vm = VictoriaMetrics::start().await;
    let names = Names::new("hour_ahead");
    let _cleanup = names.cleanup(&[]);
    let data = tempfile::tempdir().unwrap();
    let running = start(&names, &vm, data.path()).await;
    let now = wall_now();
    let base = now - 600;
    let mut accepted = Vec::new();
    let mut all = Vec::new();
    let mut from_future = 0;
    // Where the fast source's message ends the first part of the stream.
    let mut split = 0;
    // 240 s of honest event time: four buckets, each closed by the
    // watermark of an honest source only after it moved on.
    for step in 0..240u64 {
        for host in 0..10u64 {
            let body = message(
                "lga",
                &format!("lga-{host}"),
                base + step,
                host,
                1 + step as u32 % 7,
            );
            accepted.push(body.clone());
            all.push(body);
        }
        if step % 20 == 5 {
            all.push(message("ams", "ams-wrong", now + 3600, 99, 1000));
            from_future += 1;
        }
        if step == 10 {
            // Almost 14 minutes ahead of the honest ones, 4 minutes ahead
            // of the wall clock: inside max_future_secs.
            let body = message("fra", "fra-fast", now + 240, 77, 5);
            accepted.push(body.clone());
            all.push(body);
            split = all.len();
        }
    }
    // The pipeline takes the fast source's message and ticks (its
    // watermark moves, flushes go out) before the honest ones go on.
    publish(&names, &all[..split]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while running.counters.messages.load(Ordering::Relaxed) < split as u64 {
        assert!(std::time::Instant::now() < deadline, "first part not taken");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    publish(&names, &all[split..]).await;

    let want = expected(&accepted, WIDTH);
    running.wait_points(want.len()).await;
    let counters = running.counters.clone();
    running.stop().await;
    compare(&read_back(&vm).await, &want);
    assert_eq!(counters.late_samples.load(Ordering::Relaxed), 0);
    assert_eq!(counters.dead_lettered.load(Ordering::Relaxed), from_future);
    assert_eq!(ready(&names.queue()).await, 0, "everything acked");
}
