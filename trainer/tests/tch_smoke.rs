//! libtorch links and runs from `cargo test`: a tensor op and a backward pass on the CPU.
use tch::{Device, Kind, Tensor};

#[test]
fn matmul_and_backward_on_cpu() {
    // y = sum(x @ w), so dy/dw = x^T @ ones: each column of the grad is the column sums of x.
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]); // (2, 2)
    let w = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true); // (2, 3)
    let y = x.matmul(&w).sum(Kind::Float);
    assert_eq!(y.double_value(&[]), 30.0);
    y.backward();
    let grad: Vec<f32> = Vec::try_from(w.grad().flatten(0, -1)).unwrap();
    assert_eq!(grad, vec![4.0, 4.0, 4.0, 6.0, 6.0, 6.0]);
}
