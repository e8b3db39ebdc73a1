//! The teacher server and the student worker scale 8-bit pixels to the very same f32 values (a
//! teacher that saw other inputs than the student would teach a slightly different function).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use candle_core::Device;
use distill_proto::pb;
use student_worker::decode::{BatchSpec, decode_eval};
use teacher_server::{ServeOptions, build_service};

#[test]
fn teacher_and_student_see_bit_identical_pixels() {
    let bytes: Vec<u8> = (0..=255).collect();
    let u8_tensor = || pb::Tensor {
        shape: vec![1, 256],
        dtype: pb::DType::DtypeU8 as i32,
        data: bytes.clone().into(),
    };

    let ck = distill_testkit::random_checkpoint("mlp:256-4-2", 0);
    let service = build_service(&ck, &Device::Cpu, &ServeOptions::default()).unwrap();
    let teacher = service
        .validate(pb::InferRequest {
            request_id: 0,
            inputs: Some(u8_tensor()),
            temperature: 1.0,
            output_dtype: 0,
            ..Default::default()
        })
        .unwrap()
        .job
        .x;

    let student = decode_eval(
        pb::EvalBatch {
            inputs: Some(u8_tensor()),
            labels: Some(pb::Tensor {
                shape: vec![1],
                dtype: pb::DType::DtypeI64 as i32,
                data: 0i64.to_le_bytes().to_vec().into(),
            }),
        },
        &BatchSpec {
            input_shape: vec![256],
            classes: 2,
            temperature: 1.0,
            positions: None,
        },
    )
    .unwrap()
    .x;

    assert_eq!(teacher.len(), 256);
    assert_eq!(student.len(), 256);
    for v in 0..=255u8 {
        let i = usize::from(v);
        let core = distill_core::data::pixel_to_f32(v);
        // Bit patterns, so even a one-ulp difference fails (`v * (1/255)` is one ulp off
        // `v / 255` for 126 of these values).
        assert_eq!(teacher[i].to_bits(), core.to_bits(), "teacher, byte {v}");
        assert_eq!(student[i].to_bits(), core.to_bits(), "student, byte {v}");
        assert_eq!(
            core.to_bits(),
            (f32::from(v) / 255.0).to_bits(),
            "core, byte {v}"
        );
    }
}
