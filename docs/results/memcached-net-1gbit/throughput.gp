# Workload throughput per mode, with the noisy neighbour on y2 and the migration events.
# Written by Workloads/bench/report.py; regenerate with: cd OUT_DIR && gnuplot throughput.gp
# Data: plotdata/<dir>-load.dat (ops/s per load interval, x = s since load start, drawn as steps
# over each interval) and plotdata/<dir>-neighbour.dat (neighbour work units/s).
set encoding utf8
do for [fmt in "png svg"] {
  if (fmt eq "png") {
    set terminal pngcairo noenhanced size 1200,960 font "sans,10"
    set output "throughput.png"
  } else {
    set terminal svg noenhanced size 1200,960 dynamic font "sans,10" background rgb "white"
    set output "throughput.svg"
  }
  set multiplot layout 3,1
  set xrange [0.000:62.372]
  set grid xtics ytics lc rgb "#dddddd"
  set xlabel "s since load start"
  set key bottom left opaque box samplen 2 font ",8"
  set tics out
  set border 11
  unset arrow
  unset label
  set title "memcached enlightened: downtime 66 ms, T_release 12,720 ms"
  set yrange [0:5874.000]
  set ylabel "workload ops/s"
  set y2range [0:180.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 20.640, graph 0 to 20.640, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 20.640, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 20.706, graph 0 to 20.706, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 20.706, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 22.377, graph 0 to 22.377, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 22.377, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 36.427, graph 0 to 36.427, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 36.427, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 2787.300 to graph 1, first 2787.300 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 102.764 to graph 1, second 102.764 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-enlightened-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-enlightened-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "memcached postcopy: downtime 296 ms, T_release 32,064 ms"
  set yrange [0:4746.000]
  set ylabel "workload ops/s"
  set y2range [0:185.850]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 22.852, graph 0 to 22.852, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 22.852, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 23.149, graph 0 to 23.149, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 23.149, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 26.988, graph 0 to 26.988, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 26.988, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 55.412, graph 0 to 55.412, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 55.412, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 1365.570 to graph 1, first 1365.570 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 102.436 to graph 1, second 102.436 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-postcopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-postcopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset arrow
  unset label
  set title "memcached precopy: downtime 324 ms, T_release 38,986 ms"
  set yrange [0:3006.000]
  set ylabel "workload ops/s"
  set y2range [0:186.000]
  set y2tics
  set ytics nomirror
  set y2label "neighbour units/s"
  set border 15
  set arrow from 10.000, graph 0 to 10.000, graph 1 nohead lc rgb "#7f7f7f" dt 3 lw 1.2 front
  set label "contention" at 10.000, graph 0.97 left offset char 0.3,0 tc rgb "#7f7f7f" font ",8" front
  set arrow from 20.000, graph 0 to 20.000, graph 1 nohead lc rgb "#2ca02c" dt 2 lw 1.2 front
  set label "migrate" at 20.000, graph 0.91 left offset char 0.3,0 tc rgb "#2ca02c" font ",8" front
  set arrow from 58.582, graph 0 to 58.582, graph 1 nohead lc rgb "#d62728" dt 1 lw 1.2 front
  set label "STOP" at 58.582, graph 0.85 left offset char 0.3,0 tc rgb "#d62728" font ",8" front
  set arrow from 58.906, graph 0 to 58.906, graph 1 nohead lc rgb "#9467bd" dt 1 lw 1.2 front
  set label "RESUME" at 58.906, graph 0.79 left offset char 0.3,0 tc rgb "#9467bd" font ",8" front
  set arrow from 59.232, graph 0 to 59.232, graph 1 nohead lc rgb "#8c564b" dt 4 lw 1.2 front
  set label "switch" at 59.232, graph 0.73 left offset char 0.3,0 tc rgb "#8c564b" font ",8" front
  set arrow from 62.372, graph 0 to 62.372, graph 1 nohead lc rgb "#17becf" dt 2 lw 1.2 front
  set label "end" at 62.372, graph 0.67 left offset char 0.3,0 tc rgb "#17becf" font ",8" front
  set arrow from graph 0, first 806.760 to graph 1, first 806.760 nohead lc rgb "#1f77b4" dt 3 lw 0.8 back
  set arrow from graph 0, second 102.436 to graph 1, second 102.436 nohead lc rgb "#ff7f0e" dt 3 lw 0.8 back
  plot "plotdata/memcached-precopy-load.dat" using 1:2 with steps lw 2 lc rgb "#1f77b4" title "workload ops/s", \
       "plotdata/memcached-precopy-neighbour.dat" using 1:2 axes x1y2 with steps lw 1 lc rgb "#ff7f0e" title "neighbour units/s"
  unset y2label
  unset multiplot
  unset output
}
